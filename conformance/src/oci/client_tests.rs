//! The client against a fake registry on loopback: a bearer challenge is answered once through the
//! token service, and redirects keep credentials only on the registry's own origin.

use std::sync::{Arc, Mutex};

use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Client;
use crate::oci::OciConfig;
use crate::oci::auth::base64;

/// Each request the fake saw: `"GET /path?query"` and its `Authorization` value.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Serves until the test ends: `/token` (basic `u:p` only), `/v2/x/tags/list` (bearer `t1`
/// only), `/v2/redirect/{same,other}` (307 to `/v2/echo` on 127.0.0.1 or on `localhost`) and
/// `/v2/echo`, which answers whether it got credentials.
async fn fake_registry() -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let line = head.lines().next().unwrap_or("").rsplit_once(' ').map_or("", |(l, _)| l).to_string();
            let auth = head
                .lines()
                .find_map(|l| l.split_once(": ").filter(|(k, _)| k.eq_ignore_ascii_case("authorization")))
                .map(|(_, v)| v.to_string());
            log.lock().unwrap().push((line.clone(), auth.clone()));
            let path = line.split_once(' ').map_or("", |(_, p)| p);
            let (status, extra, body) = if path.starts_with("/token") {
                match (auth.as_deref() == Some(&format!("Basic {}", base64(b"u:p"))), path.contains("scope="))
                {
                    (true, true) => ("200 OK", String::new(), r#"{"token":"t1"}"#.to_string()),
                    _ => ("401 Unauthorized", String::new(), String::new()),
                }
            } else if path == "/v2/x/tags/list" && auth.as_deref() != Some("Bearer t1") {
                let realm = format!("http://127.0.0.1:{port}/token");
                let ch = format!(
                    "WWW-Authenticate: Bearer realm=\"{realm}\",service=\"fake\",scope=\"repository:x:pull\"\r\n"
                );
                ("401 Unauthorized", ch, String::new())
            } else if let Some(which) = path.strip_prefix("/v2/redirect/") {
                let host = if which == "same" { "127.0.0.1" } else { "localhost" };
                (
                    "307 Temporary Redirect",
                    format!("Location: http://{host}:{port}/v2/echo\r\n"),
                    String::new(),
                )
            } else if path == "/v2/echo" {
                ("200 OK", String::new(), if auth.is_some() { "auth" } else { "none" }.to_string())
            } else {
                ("200 OK", String::new(), "{}".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        }
    });
    (port, seen)
}

fn client(port: u16) -> Client {
    let config = OciConfig {
        url: format!("http://127.0.0.1:{port}"),
        username: Some("u".into()),
        password: Some("p".into()),
        ..OciConfig::default()
    };
    Client::new(&config).unwrap()
}

#[tokio::test]
async fn a_bearer_challenge_is_answered_once_and_the_token_reused() {
    let (port, seen) = fake_registry().await;
    let c = client(port);
    for _ in 0..2 {
        let resp = c.send(c.req(Method::GET, "/v2/x/tags/list")).await.unwrap();
        assert_eq!(resp.code(), 200);
    }
    let seen = seen.lock().unwrap().clone();
    let lines: Vec<&str> = seen.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(lines.len(), 4, "401, token, retry, then the token up front: {lines:?}");
    assert_eq!(lines[1], "GET /token?service=fake&scope=repository%3Ax%3Apull");
    assert_eq!(seen[3].1.as_deref(), Some("Bearer t1"));
}

#[tokio::test]
async fn redirects_keep_credentials_only_on_the_same_origin() {
    let (port, _) = fake_registry().await;
    let c = client(port);
    // Get a token first, so that the client sends credentials up front.
    assert_eq!(c.send(c.req(Method::GET, "/v2/x/tags/list")).await.unwrap().code(), 200);
    let same = c.send(c.req(Method::GET, "/v2/redirect/same")).await.unwrap();
    assert_eq!((same.code(), &same.body[..]), (200, &b"auth"[..]));
    let other = c.send(c.req(Method::GET, "/v2/redirect/other")).await.unwrap();
    assert_eq!((other.code(), &other.body[..]), (200, &b"none"[..]));
    assert_eq!(other.url.host_str(), Some("localhost"));
}
