//! Compiles `proto/billing/v1/*.proto` with a vendored `protoc`, so building
//! needs no hand-installed protobuf compiler, and writes the descriptor set
//! that the reflection service serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = [
        "proto/billing/v1/balances.proto",
        "proto/billing/v1/balance_policy.proto",
        "proto/billing/v1/payment_methods.proto",
        "proto/billing/v1/notifications.proto",
        "proto/billing/v1/errors.proto",
        "proto/billing/v1/audit.proto",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        // Bad request bodies are INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::ProtoCodec")
        .file_descriptor_set_path(out_dir.join("billing_descriptor.bin"))
        .compile_protos(&protos, &[PathBuf::from("proto"), well_known])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
