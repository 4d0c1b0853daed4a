//! The generated gRPC types of `proto/billing/v1` and the descriptor set
//! served by reflection.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod billing {
    pub mod v1 {
        tonic::include_proto!("billing.v1");
    }
}

pub use billing::v1::*;

/// Every message and service of `billing.v1`, for the reflection service.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("billing_descriptor");
