// Generates the gRPC code without a system protoc: protox parses the .proto files in Rust.
fn main() {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["gantry.proto"], ["proto"]).expect("proto/gantry.proto does not parse");
    tonic_prost_build::configure().compile_fds(fds).expect("generating gRPC code failed");
}
