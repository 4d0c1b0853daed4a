//! The protobuf codec of billing's services: tonic-prost's, except that a
//! request body that does not decode is the caller's bad input —
//! `INVALID_ARGUMENT` with a `BadRequest` naming the field prost could not
//! read (`description`, `card.number`; `request` when it names none) — not
//! `INTERNAL` (tonic-prost's choice, after the gRPC status-code table). So
//! garbage from a client is answered like every other bad field, and is
//! logged at INFO as a caller's mistake, not at ERROR as a server fault.
//!
//! Chosen in `build.rs` (`codec_path`); encoding is tonic-prost's own.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::error::BillingError;

/// [`ProstCodec`] with bad request bodies answered `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder {
            inner: ProstDecoder::new(BufferSettings::default()),
        }
    }
}

/// Decodes `U` as prost does; a failure becomes [`bad_body`].
#[derive(Debug)]
pub struct ProtoDecoder<U> {
    inner: ProstDecoder<U>,
}

impl<U: Message + Default> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.inner
            .decode(buf)
            .map_err(|status| bad_body(status.message()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}

/// `INVALID_ARGUMENT` for a body prost could not decode. `error` is prost's
/// message: `failed to decode Protobuf message: Inner.field: Outer.field:
/// what went wrong`; the field path (`billing_address.city`) is read from
/// its `Type.field:` parts, outermost first. A field inside a `oneof` is
/// named through the oneof (`source.number`): prost records the oneof's
/// name, not the case's.
pub fn bad_body(error: &str) -> Status {
    let detail = error
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(error);
    let mut fields = Vec::new();
    let mut rest = detail;
    while let Some((part, after)) = rest.split_once(": ") {
        let Some((message, field)) = part.split_once('.') else {
            break;
        };
        let is_name =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !is_name(message) || !is_name(field) {
            break;
        }
        fields.push(field);
        rest = after;
    }
    // prost names the innermost field first.
    fields.reverse();
    let field = if fields.is_empty() {
        "request".to_owned()
    } else {
        fields.join(".")
    };
    BillingError::invalid(field, format!("is not a valid protobuf message: {rest}")).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(status: &Status) -> String {
        let details = tonic_types::StatusExt::get_error_details(status);
        details.bad_request().unwrap().field_violations[0]
            .field
            .clone()
    }

    #[test]
    fn a_body_that_does_not_decode_is_invalid_argument_naming_the_field() {
        let status = bad_body(
            "failed to decode Protobuf message: DebitRequest.description: invalid string value: data is not UTF-8 encoded",
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(field_of(&status), "description");
        assert!(
            status.message().contains("not UTF-8"),
            "{}",
            status.message()
        );

        let anonymous = bad_body("failed to decode Protobuf message: invalid varint");
        assert_eq!(anonymous.code(), tonic::Code::InvalidArgument);
        assert_eq!(field_of(&anonymous), "request");
    }

    #[test]
    fn prost_errors_of_garbage_bytes_name_the_field() {
        let decode = |bytes: &[u8]| {
            crate::proto::DebitRequest::decode(bytes)
                .map_err(|e| bad_body(&e.to_string()))
                .unwrap_err()
        };
        // A truncated varint: field 1, wire type 0, no value.
        assert_eq!(decode(&[0x08, 0xff]).code(), tonic::Code::InvalidArgument);
        // Field 4 (description), length 2, invalid UTF-8.
        assert_eq!(field_of(&decode(&[0x22, 0x02, 0xc3, 0x28])), "description");
        // AddCardRequest.billing_address (field 4) holding city (field 3)
        // with invalid UTF-8: the path outermost first.
        let nested =
            crate::proto::AddCardRequest::decode(&[0x22, 0x04, 0x1a, 0x02, 0xc3, 0x28][..])
                .map_err(|e| bad_body(&e.to_string()))
                .unwrap_err();
        assert_eq!(field_of(&nested), "billing_address.city");
    }
}
