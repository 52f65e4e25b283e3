//! grok-proto: the gRPC wire types and services of grok-cluster, generated at build time from
//! `proto/*.proto` with a pure-Rust protobuf compiler (no system protoc), and [`telemetry`]:
//! the binaries' logs and OpenTelemetry spans, whose context travels in the wire messages.

pub mod telemetry;

pub mod v1 {
    tonic::include_proto!("grok.v1");
}

/// The encoded `FileDescriptorSet` of `grok.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/grok_descriptor.bin"));
