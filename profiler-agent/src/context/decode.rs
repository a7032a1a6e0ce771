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

/// Which labels carry the trace and span ids (label-based sources: custom-labels, Go labels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdLabels {
    /// Label keys whose value is the trace id as 32 hex digits, in order of preference.
    pub trace_id: Vec<String>,
    /// Label keys whose value is the span id as 16 hex digits.
    pub span_id: Vec<String>,
}

impl Default for IdLabels {
    fn default() -> Self {
        Self {
            trace_id: vec!["trace_id".into()],
            span_id: vec!["span_id".into()],
        }
    }
}

/// custom-labels payload (see `profiler_common::custom_labels`): `{u8 key_len; u8 value_len;
/// key; value}` entries, lengths as declared (capped at 255), bytes as copied (truncated to the
/// maximums). The id labels become the context; the others its labels. The first occurrence of
/// a key wins (the custom-labels rule).
pub fn decode_custom_labels(payload: &[u8], ids: &IdLabels) -> DecodeOutcome {
    use profiler_common::custom_labels::{MAX_KEY, MAX_VALUE};
    let mut pairs: Vec<(String, String, bool)> = Vec::new();
    let mut rest = payload;
    let mut dropped_attributes = 0;
    while let [key_len, value_len, tail @ ..] = rest {
        let (key_len, value_len) = (usize::from(*key_len), usize::from(*value_len));
        let (key_copied, value_copied) = (key_len.min(MAX_KEY), value_len.min(MAX_VALUE));
        let Some(entry) = tail.get(..key_copied + value_copied) else {
            return DecodeOutcome::Invalid("context_truncated");
        };
        rest = &tail[key_copied + value_copied..];
        if key_copied < key_len {
            dropped_attributes += 1; // a truncated key is not the key it claims to be
            continue;
        }
        let key = String::from_utf8_lossy(&entry[..key_copied]).into_owned();
        if pairs.iter().any(|(k, _, _)| *k == key) {
            continue;
        }
        let value = String::from_utf8_lossy(&entry[key_copied..]).into_owned();
        pairs.push((key, value, value_copied < value_len));
    }
    labels_to_context(pairs, ids, dropped_attributes)
}

/// Splits labels into the ids and the rest. `(key, value, value_truncated)`.
pub(crate) fn labels_to_context(
    pairs: Vec<(String, String, bool)>,
    ids: &IdLabels,
    mut dropped_attributes: u32,
) -> DecodeOutcome {
    let find = |keys: &[String]| {
        keys.iter()
            .find_map(|k| pairs.iter().find(|(key, _, _)| key == k))
    };
    let Some((_, trace_text, truncated)) = find(&ids.trace_id) else {
        return DecodeOutcome::Empty;
    };
    let Some(trace_id) = super::parse_hex_array::<16>(trace_text).filter(|_| !truncated) else {
        return DecodeOutcome::Invalid("context_bad_trace_id");
    };
    if trace_id == [0; 16] {
        return DecodeOutcome::Empty;
    }
    let span_id = match find(&ids.span_id) {
        Some((_, text, false)) => match super::parse_hex_array::<8>(text) {
            Some(id) => id,
            None => return DecodeOutcome::Invalid("context_bad_span_id"),
        },
        Some((_, _, true)) => return DecodeOutcome::Invalid("context_bad_span_id"),
        None => [0; 8],
    };
    let is_id = |k: &String| ids.trace_id.contains(k) || ids.span_id.contains(k);
    let mut labels: Vec<(Arc<str>, Arc<str>)> = Vec::new();
    for (key, value, truncated) in &pairs {
        if is_id(key) {
            continue;
        }
        if *truncated {
            dropped_attributes += 1;
        }
        labels.push((key.as_str().into(), value.as_str().into()));
    }
    labels.sort();
    DecodeOutcome::Context {
        context: TraceContext {
            trace_id,
            span_id,
            sampled: true,
            labels: labels.into(),
        },
        dropped_attributes,
        unknown_keys: 0,
    }
}

/// OBI `traces_ctx_v1` value: trace id and span id, no flags (counts as sampled).
pub fn decode_obi(payload: &[u8]) -> DecodeOutcome {
    let (Some(trace), Some(span)) = (payload.get(..16), payload.get(16..24)) else {
        return DecodeOutcome::Invalid("context_truncated");
    };
    let trace_id: [u8; 16] = trace.try_into().expect("16 bytes");
    if trace_id == [0; 16] {
        return DecodeOutcome::Empty;
    }
    DecodeOutcome::Context {
        context: TraceContext {
            trace_id,
            span_id: span.try_into().expect("8 bytes"),
            sampled: true,
            labels: Arc::new([]),
        },
        dropped_attributes: 0,
        unknown_keys: 0,
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;

    fn entry(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut v = vec![key.len() as u8, value.len() as u8];
        v.extend(&key[..key.len().min(24)]);
        v.extend(&value[..value.len().min(48)]);
        v
    }

    #[test]
    fn custom_labels_carry_ids_and_labels() {
        let trace = "0af7651916cd43dd8448eb211c80319c";
        let mut payload = entry(b"trace_id", trace.as_bytes());
        payload.extend(entry(b"span_id", b"b7ad6b7169203331"));
        payload.extend(entry(b"http.route", b"/cart"));
        payload.extend(entry(b"http.route", b"/ignored"));
        let out = decode_custom_labels(&payload, &IdLabels::default());
        let DecodeOutcome::Context {
            context,
            dropped_attributes,
            ..
        } = out
        else {
            panic!("{out:?}")
        };
        assert_eq!(super::super::hex(&context.trace_id), trace);
        assert_eq!(super::super::hex(&context.span_id), "b7ad6b7169203331");
        assert_eq!(&*context.labels, &[("http.route".into(), "/cart".into())]);
        assert_eq!(dropped_attributes, 0);
    }

    #[test]
    fn custom_labels_garbage() {
        assert_eq!(
            decode_custom_labels(&entry(b"user", b"x"), &IdLabels::default()),
            DecodeOutcome::Empty
        );
        assert_eq!(
            decode_custom_labels(&entry(b"trace_id", b"nothex"), &IdLabels::default()),
            DecodeOutcome::Invalid("context_bad_trace_id")
        );
        assert_eq!(
            decode_custom_labels(&[5, 5, b'a'], &IdLabels::default()),
            DecodeOutcome::Invalid("context_truncated")
        );
        // A value longer than what was copied is not a trace id.
        let long = "0af7651916cd43dd8448eb211c80319c".repeat(2);
        assert_eq!(
            decode_custom_labels(&entry(b"trace_id", long.as_bytes()), &IdLabels::default()),
            DecodeOutcome::Invalid("context_bad_trace_id")
        );
    }

    #[test]
    fn obi_values() {
        let mut v = vec![7u8; 16];
        v.extend([9u8; 8]);
        let DecodeOutcome::Context { context, .. } = decode_obi(&v) else {
            panic!()
        };
        assert_eq!(
            (context.trace_id, context.span_id, context.sampled),
            ([7; 16], [9; 8], true)
        );
        assert_eq!(decode_obi(&[0; 24]), DecodeOutcome::Empty);
        assert_eq!(
            decode_obi(&[1; 3]),
            DecodeOutcome::Invalid("context_truncated")
        );
    }
}
