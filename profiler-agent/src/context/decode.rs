//! Decoding raw context payloads copied by the kernel. Nothing here trusts the bytes: a record
//! with a bad length, an all-zero id or an unknown key index costs that sample's context (or
//! that attribute), is reported in the outcome, and never panics.

use std::sync::Arc;

use profiler_common::ThreadContextHeader;

use super::TraceContext;

/// What decoding a payload gave, with what it had to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeOutcome {
    Context {
        context: TraceContext,
        dropped_attributes: u32,
        unknown_keys: u32,
    },
    /// The record carried no trace (all-zero ids): not an error.
    Empty,
    /// The payload was malformed; the reason names a counter.
    Invalid(&'static str),
}

/// OTEP 4947 record: 28-byte header (`valid` already checked in the kernel, checked again here)
/// then `{u8 key_index; u8 len; u8 value[len]}` entries. `key_map` names the key indexes
/// (from the process context's `threadlocal.attribute_key_map`). The last occurrence of a key
/// wins; an entry that does not fit ends the list.
pub fn decode_thread_context(payload: &[u8], key_map: &[Arc<str>]) -> DecodeOutcome {
    const HEADER: usize = size_of::<ThreadContextHeader>();
    let Some(header) = payload.get(..HEADER) else {
        return DecodeOutcome::Invalid("context_truncated");
    };
    if header[24] != 1 {
        return DecodeOutcome::Invalid("context_not_valid");
    }
    let trace_id: [u8; 16] = header[..16].try_into().expect("16 bytes");
    let span_id: [u8; 8] = header[16..24].try_into().expect("8 bytes");
    let flags = header[25];
    let declared = usize::from(u16::from_ne_bytes([header[26], header[27]]));
    if trace_id == [0; 16] {
        return if span_id == [0; 8] {
            DecodeOutcome::Empty
        } else {
            DecodeOutcome::Invalid("context_span_without_trace")
        };
    }
    let attrs = &payload[HEADER..];
    // The kernel copies at most the attribute budget; a larger declared size was cut there.
    let mut dropped_attributes = u32::from(declared > attrs.len());
    let attrs = &attrs[..attrs.len().min(declared)];

    let mut labels: Vec<(Arc<str>, Arc<str>)> = Vec::new();
    let mut unknown_keys = 0;
    let mut rest = attrs;
    while let [key_index, len, tail @ ..] = rest {
        let len = usize::from(*len);
        let Some(value) = tail.get(..len) else {
            dropped_attributes += 1;
            break;
        };
        rest = &tail[len..];
        let Some(key) = key_map.get(usize::from(*key_index)) else {
            unknown_keys += 1;
            continue;
        };
        let value: Arc<str> = String::from_utf8_lossy(value).into();
        match labels.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => labels.push((key.clone(), value)),
        }
    }
    if rest.len() == 1 {
        dropped_attributes += 1;
    }
    labels.sort();
    DecodeOutcome::Context {
        context: TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
            labels: labels.into(),
        },
        dropped_attributes,
        unknown_keys,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(trace: u8, span: u8, valid: u8, flags: u8, attrs: &[u8], declared: u16) -> Vec<u8> {
        let mut v = vec![trace; 16];
        v.extend([span; 8]);
        v.extend([valid, flags]);
        v.extend(declared.to_ne_bytes());
        v.extend(attrs);
        v
    }

    fn keys() -> Vec<Arc<str>> {
        vec!["http.route".into(), "user.id".into()]
    }

    #[test]
    fn decodes_ids_flags_and_attributes() {
        let attrs = [
            0, 4, b'/', b'a', b'p', b'i', 1, 2, b'4', b'2', 0, 2, b'/', b'x',
        ];
        let out = decode_thread_context(
            &record(0xaa, 0xbb, 1, 1, &attrs, attrs.len() as u16),
            &keys(),
        );
        let DecodeOutcome::Context {
            context,
            dropped_attributes,
            unknown_keys,
        } = out
        else {
            panic!("{out:?}")
        };
        assert_eq!(context.trace_id, [0xaa; 16]);
        assert_eq!(context.span_id, [0xbb; 8]);
        assert!(context.sampled);
        assert_eq!((dropped_attributes, unknown_keys), (0, 0));
        // Last occurrence wins; sorted by key.
        assert_eq!(
            &*context.labels,
            &[
                ("http.route".into(), "/x".into()),
                ("user.id".into(), "42".into())
            ]
        );
    }

    #[test]
    fn garbage_costs_only_what_is_broken() {
        // Unknown key index, then an entry that does not fit.
        let attrs = [9, 1, b'z', 0, 200, b'a'];
        let out = decode_thread_context(&record(1, 2, 1, 0, &attrs, 6), &keys());
        let DecodeOutcome::Context {
            context,
            dropped_attributes,
            unknown_keys,
        } = out
        else {
            panic!()
        };
        assert!(!context.sampled);
        assert!(context.labels.is_empty());
        assert_eq!((dropped_attributes, unknown_keys), (1, 1));
        // Declared size larger than what was copied.
        let out = decode_thread_context(&record(1, 2, 1, 1, &[], 65535), &keys());
        assert!(matches!(
            out,
            DecodeOutcome::Context {
                dropped_attributes: 1,
                ..
            }
        ));
        assert_eq!(
            decode_thread_context(&record(1, 2, 7, 1, &[], 0), &keys()),
            DecodeOutcome::Invalid("context_not_valid")
        );
        assert_eq!(
            decode_thread_context(&[1, 2, 3], &keys()),
            DecodeOutcome::Invalid("context_truncated")
        );
        assert_eq!(
            decode_thread_context(&record(0, 0, 1, 0, &[], 0), &keys()),
            DecodeOutcome::Empty
        );
        assert_eq!(
            decode_thread_context(&record(0, 5, 1, 0, &[], 0), &keys()),
            DecodeOutcome::Invalid("context_span_without_trace")
        );
        // Invalid UTF-8 is kept, lossily.
        let out = decode_thread_context(&record(1, 2, 1, 1, &[1, 2, 0xff, 0xfe], 4), &keys());
        let DecodeOutcome::Context { context, .. } = out else {
            panic!()
        };
        assert_eq!(&*context.labels[0].1, "\u{fffd}\u{fffd}");
    }
}
