//! Compiles the NSM protos with protox (pure Rust, no system protoc) and tonic-prost-build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/connectioncontext.proto",
        "proto/connection.proto",
        "proto/networkservice.proto",
        "proto/registry.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
