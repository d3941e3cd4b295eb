//! Compiles our .proto files without a system `protoc`: protox parses them into a descriptor
//! set, which tonic-prost-build turns into Rust types and gRPC stubs.

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/envoy/status.proto",
    "proto/envoy/discovery.proto",
    "proto/istio/workload.proto",
    "proto/istio/authorization.proto",
    "proto/istio/zds.proto",
    "proto/istio/ca.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let fds_path = out.join("descriptors.bin");
    std::fs::write(&fds_path, fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(&fds_path)
        .skip_protoc_run()
        .compile_protos(PROTOS, &["proto"])?;
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
