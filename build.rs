//! Generates the gRPC service (`src/server/grpc/grpc_service.proto`) with tonic-prost-build.
//! protoc is the same one candle-onnx's build needs (Debian's protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "src/server/grpc/grpc_service.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&[proto], &["src/server/grpc"])?;
    Ok(())
}
