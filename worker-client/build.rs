//! Generates the gRPC code for containerd's API from the `.proto` files vendored under `proto/`
//! (containerd's, Apache-2.0, see `proto/LICENSE`): the Snapshots service (server and client)
//! and the content, images and leases clients `starlight-pull --containerd` uses.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/services/snapshots/v1/snapshots.proto",
        "proto/services/content/v1/content.proto",
        "proto/services/images/v1/images.proto",
        "proto/services/leases/v1/leases.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-changed=proto/types");
    tonic_prost_build::configure().compile_protos(&protos, &["proto"]).map_err(|e| {
        format!("{e} (protoc and Google's .proto files are needed: apt-get install -y protobuf-compiler libprotobuf-dev)")
    })?;
    Ok(())
}
