//! Trace context: what a sample's raw context payload means. The kernel copies bytes from the
//! target as they are; this module validates and decodes them (a target may write anything),
//! and decides per process which source the kernel should read (`sources`).

pub mod decode;
pub mod sources;

use std::sync::Arc;

pub use decode::{
    DecodeOutcome, IdLabels, decode_custom_labels, decode_obi, decode_thread_context,
};

/// A sampled thread's active trace context, decoded and validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// W3C sampled flag; sources without flags count as sampled.
    pub sampled: bool,
    /// Extra labels that came with the context (decoded attributes), in a stable order.
    pub labels: Arc<[(Arc<str>, Arc<str>)]>,
}

impl TraceContext {
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

/// Lowercase hex, two digits a byte. (By table: the formatting machinery per byte showed in the
/// collector's profile, for the span ids of every trace sample and every build id.)
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Parses a lowercase or uppercase hex trace id (32 digits).
pub fn parse_trace_id(text: &str) -> Option<[u8; 16]> {
    parse_hex_array(text)
}

pub fn parse_hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.trim();
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = [0xab; 16];
        assert_eq!(parse_trace_id(&hex(&id)), Some(id));
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
        assert_eq!(parse_trace_id("zz"), None);
        assert_eq!(parse_trace_id(&"0".repeat(31)), None);
        assert_eq!(
            parse_hex_array::<8>("00112233445566ff"),
            Some([0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0xff])
        );
    }
}
