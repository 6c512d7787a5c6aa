//! The real `starlight-gateway` binary with `OTEL_EXPORTER_OTLP_ENDPOINT` set exports one span per
//! request over OTLP gRPC (to a receiver in this test), and exits cleanly on SIGTERM, flushing them.

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use starlight_conformance::servers::{Registry, free_port};

type Spans = Arc<Mutex<Vec<(String, Vec<(String, String)>)>>>;

struct Receiver(Spans);

#[tonic::codegen::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let attrs = span
                        .attributes
                        .into_iter()
                        .map(|kv| {
                            let v = match kv.value.and_then(|v| v.value) {
                                Some(Value::StringValue(s)) => s,
                                Some(Value::IntValue(i)) => i.to_string(),
                                Some(other) => format!("{other:?}"),
                                None => String::new(),
                            };
                            (kv.key, v)
                        })
                        .collect();
                    spans.push((span.name, attrs));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_exported_as_otlp_spans() {
    let spans: Spans = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    let receiver = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(spans.clone())))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let reg = Registry::start();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut gw = Command::new(env!("CARGO_BIN_EXE_starlight-gateway"))
        .args(["--upstream", &format!("http://{}", reg.addr()), "--listen", &listen])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&listen).is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = reqwest::Client::new();
    assert_eq!(c.get(format!("http://{listen}/v2/")).send().await.unwrap().status(), 200);
    let r = c.get(format!("http://{listen}/v2/team/app/manifests/latest")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // SIGTERM: graceful shutdown, exit 0, buffered spans flushed on the way out.
    // SAFETY: signalling the child we spawned, by its PID.
    assert_eq!(unsafe { libc::kill(gw.id() as i32, libc::SIGTERM) }, 0);
    let status = gw.wait().unwrap();
    assert!(status.success(), "gateway exited with {status}");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        {
            let spans = spans.lock().unwrap();
            let found = spans.iter().find(|(name, attrs)| {
                name == "request"
                    && attrs.contains(&("repository".into(), "team/app".into()))
                    && attrs.contains(&("route".into(), "manifests".into()))
                    && attrs.contains(&("status".into(), "404".into()))
            });
            if found.is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "no span for the manifest request; got {:?}", *spans);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    receiver.abort();
}
