//! The client-facing APIs: gRPC ([`grpc`]) and the OpenAI-compatible HTTP API ([`http`]).
//! Each turns its wire format into a [`crate::request`] and back, and nothing else.

pub mod grpc;
pub mod http;
