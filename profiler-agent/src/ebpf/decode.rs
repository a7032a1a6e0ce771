//! Checked decoding of ring-buffer records. The bytes come from the kernel, but every length is
//! still verified against the record size: a bad record is a counted error, never a panic.

use profiler_common::{
    COMM_LEN, ContextKind, MAX_CONTEXT_BYTES, MAX_STACK_DEPTH, ProcessEvent, RecordKind,
    SampleBatchHeader, SampleHeader, sample_flags,
};

/// One decoded ring-buffer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Sample(RawSample),
    Exec {
        tgid: u32,
        ktime_ns: u64,
        comm: String,
    },
    Exit {
        tgid: u32,
        ktime_ns: u64,
    },
    /// The process mapped a file executable (a library loaded late).
    MmapExec {
        tgid: u32,
    },
}

/// A sample as the kernel captured it: absolute addresses, raw context bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSample {
    pub tgid: u32,
    pub tid: u32,
    pub cpu: u32,
    pub ktime_ns: u64,
    pub flags: u16,
    pub thread_name: String,
    /// Leaf first.
    pub user_stack: Vec<u64>,
    /// Leaf first.
    pub kernel_stack: Vec<u64>,
    /// The word at the interrupted user stack pointer, when the kernel read it: the return
    /// address of a function that set up no frame (see `ProcessTable::normalize`).
    pub user_stack_top: Option<u64>,
    pub context_kind: ContextKind,
    pub context: Vec<u8>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than its header")]
    TooShort(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u16),
    #[error("record declares {declared} bytes of payload but carries {actual}")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("record declares {0} frames, more than the maximum")]
    TooManyFrames(usize),
    #[error("unknown context kind {0}")]
    UnknownContextKind(u8),
    #[error("a sample batch has {0} bytes after its last sample")]
    BatchTrailingBytes(usize),
    #[error("a batch may not hold another batch")]
    NestedBatch,
}

impl DecodeError {
    /// Stable name for the drop counter.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooShort(_) => "too_short",
            Self::UnknownKind(_) => "unknown_kind",
            Self::LengthMismatch { .. } => "length_mismatch",
            Self::TooManyFrames(_) => "too_many_frames",
            Self::UnknownContextKind(_) => "unknown_context_kind",
            Self::BatchTrailingBytes(_) => "batch_trailing_bytes",
            Self::NestedBatch => "nested_batch",
        }
    }
}

/// Decodes one ring-buffer item: a process event, or a batch of samples (see
/// `profiler_common::SampleStaging`). Each record, or the error that lost it, goes to `each`:
/// a sample whose length cannot be trusted loses the batch's samples after it too, and each of
/// them is reported as an error, so the drop counters count samples.
pub fn decode_item(bytes: &[u8], mut each: impl FnMut(Result<Record, DecodeError>)) {
    let is_batch = bytes.get(..2) == Some(&(RecordKind::SampleBatch as u16).to_ne_bytes()[..]);
    if !is_batch {
        each(decode(bytes));
        return;
    }
    let header = match read_pod::<SampleBatchHeader>(bytes) {
        Ok(header) => header,
        Err(e) => return each(Err(e)),
    };
    decode_batch_samples(
        header.samples,
        &bytes[size_of::<SampleBatchHeader>()..],
        each,
    );
}

/// The `samples` sample records of a batch after its header: what a CPU's staging holds.
pub fn decode_batch_samples(
    samples: u32,
    mut rest: &[u8],
    mut each: impl FnMut(Result<Record, DecodeError>),
) {
    for decoded in 0..samples {
        let sample = sample_len(rest).and_then(|len| {
            let record = decode_sample(&rest[..len])?;
            rest = rest.get(len.next_multiple_of(8)..).unwrap_or_default();
            Ok(record)
        });
        match sample {
            Ok(sample) => each(Ok(Record::Sample(sample))),
            Err(e) => {
                for _ in decoded..samples {
                    each(Err(e.clone()));
                }
                return;
            }
        }
    }
    if !rest.is_empty() {
        each(Err(DecodeError::BatchTrailingBytes(rest.len())));
    }
}

/// The length of the sample record at the start of `bytes`, from its header, checked against
/// what is there.
fn sample_len(bytes: &[u8]) -> Result<usize, DecodeError> {
    let header = read_pod::<SampleHeader>(bytes)?;
    if header.kind != RecordKind::Sample as u16 {
        return Err(match RecordKind::from_u16(header.kind) {
            Some(RecordKind::SampleBatch) => DecodeError::NestedBatch,
            Some(_) | None => DecodeError::UnknownKind(header.kind),
        });
    }
    let frames = usize::from(header.user_frames) + usize::from(header.kernel_frames);
    let declared = frames * 8 + usize::from(header.context_len);
    let actual = bytes.len() - size_of::<SampleHeader>();
    if declared > actual {
        return Err(DecodeError::LengthMismatch { declared, actual });
    }
    Ok(size_of::<SampleHeader>() + declared)
}

/// Decodes one record that is not a batch.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let kind = bytes
        .get(..2)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        .ok_or(DecodeError::TooShort(bytes.len()))?;
    match RecordKind::from_u16(kind) {
        Some(RecordKind::Sample) => decode_sample(bytes).map(Record::Sample),
        Some(RecordKind::ProcessExec) => {
            let event = read_pod::<ProcessEvent>(bytes)?;
            Ok(Record::Exec {
                tgid: event.tgid,
                ktime_ns: event.ktime_ns,
                comm: comm_to_string(&event.comm),
            })
        }
        Some(RecordKind::ProcessExit) => {
            let event = read_pod::<ProcessEvent>(bytes)?;
            Ok(Record::Exit {
                tgid: event.tgid,
                ktime_ns: event.ktime_ns,
            })
        }
        Some(RecordKind::ProcessMmapExec) => {
            let event = read_pod::<ProcessEvent>(bytes)?;
            Ok(Record::MmapExec { tgid: event.tgid })
        }
        Some(RecordKind::SampleBatch) => Err(DecodeError::NestedBatch),
        None => Err(DecodeError::UnknownKind(kind)),
    }
}

fn decode_sample(bytes: &[u8]) -> Result<RawSample, DecodeError> {
    let header = read_pod::<SampleHeader>(bytes)?;
    let user = usize::from(header.user_frames);
    let kernel = usize::from(header.kernel_frames);
    if user > MAX_STACK_DEPTH || kernel > MAX_STACK_DEPTH {
        return Err(DecodeError::TooManyFrames(user.max(kernel)));
    }
    let context_len = usize::from(header.context_len);
    let context_kind = ContextKind::from_u8(header.context_kind)
        .ok_or(DecodeError::UnknownContextKind(header.context_kind))?;
    let payload = &bytes[size_of::<SampleHeader>()..];
    let declared = (user + kernel) * 8 + context_len;
    if declared != payload.len() || context_len > MAX_CONTEXT_BYTES {
        return Err(DecodeError::LengthMismatch {
            declared,
            actual: payload.len(),
        });
    }
    let (frames, context) = payload.split_at((user + kernel) * 8);
    let mut addresses = frames
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().expect("chunks_exact(8)")));
    let user_stack = addresses.by_ref().take(user).collect();
    let kernel_stack = addresses.collect();
    Ok(RawSample {
        tgid: header.tgid,
        tid: header.tid,
        cpu: header.cpu,
        ktime_ns: header.ktime_ns,
        flags: header.flags,
        thread_name: comm_to_string(&header.comm),
        user_stack,
        kernel_stack,
        user_stack_top: (header.flags & sample_flags::USER_STACK_TOP != 0)
            .then_some(header.user_stack_top),
        context_kind,
        context: context.to_vec(),
    })
}

/// Copies a `Pod` header out of possibly unaligned bytes.
fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::TooShort(bytes.len()));
    }
    // SAFETY: `T: Pod` is valid for any bit pattern, and the length was checked.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

pub fn comm_to_string(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// A sample record as the kernel emits it: `header`, then `frames` (user frames, then kernel
/// frames, as the header counts them), then the context payload. The inverse of [`decode`],
/// for tests and the micro-benchmarks; the agent itself never builds records.
#[doc(hidden)]
pub fn encode_sample(header: &SampleHeader, frames: &[u64], context: &[u8]) -> Vec<u8> {
    // SAFETY: SampleHeader is repr(C) without padding: every byte is initialized.
    let head = unsafe {
        std::slice::from_raw_parts(
            (header as *const SampleHeader).cast::<u8>(),
            size_of::<SampleHeader>(),
        )
    };
    let mut out = Vec::with_capacity(head.len() + frames.len() * 8 + context.len());
    out.extend_from_slice(head);
    for f in frames {
        out.extend_from_slice(&f.to_ne_bytes());
    }
    out.extend_from_slice(context);
    out
}

/// A batch record as the kernel emits it: the header, then each sample record padded to 8
/// bytes. For tests and the micro-benchmarks.
#[doc(hidden)]
pub fn encode_batch(samples: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(RecordKind::SampleBatch as u16).to_ne_bytes());
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&(samples.len() as u32).to_ne_bytes());
    for sample in samples {
        out.extend_from_slice(sample);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn header(user: u16, kernel: u16, context_len: u16) -> SampleHeader {
        let mut comm = [0u8; COMM_LEN];
        comm[..6].copy_from_slice(b"worker");
        SampleHeader {
            kind: RecordKind::Sample as u16,
            flags: 0,
            cpu: 1,
            tgid: 42,
            tid: 43,
            ktime_ns: 1000,
            comm,
            user_frames: user,
            kernel_frames: kernel,
            context_kind: if context_len > 0 {
                ContextKind::ThreadContext as u8
            } else {
                0
            },
            _pad: 0,
            context_len,
            user_stack_top: 0,
        }
    }

    #[test]
    fn decodes_stacks_and_context() {
        let bytes = encode_sample(&header(2, 1, 3), &[0x10, 0x20, 0xffff_0000], &[7, 8, 9]);
        let Record::Sample(s) = decode(&bytes).unwrap() else {
            panic!("not a sample")
        };
        assert_eq!(s.user_stack, vec![0x10, 0x20]);
        assert_eq!(s.kernel_stack, vec![0xffff_0000]);
        assert_eq!(s.context, vec![7, 8, 9]);
        assert_eq!(s.context_kind, ContextKind::ThreadContext);
        assert_eq!(s.thread_name, "worker");
        assert_eq!((s.tgid, s.tid, s.cpu), (42, 43, 1));
        assert_eq!(s.user_stack_top, None);
    }

    #[test]
    fn the_stack_top_word_counts_only_when_flagged() {
        let mut h = header(1, 0, 0);
        h.user_stack_top = 0x4567;
        let decoded = |h: &SampleHeader| match decode(&encode_sample(h, &[0x10], &[])) {
            Ok(Record::Sample(s)) => s.user_stack_top,
            other => panic!("{other:?}"),
        };
        assert_eq!(decoded(&h), None);
        h.flags |= sample_flags::USER_STACK_TOP;
        assert_eq!(decoded(&h), Some(0x4567));
    }

    #[test]
    fn rejects_lies_about_length() {
        let bytes = encode_sample(&header(3, 0, 0), &[1, 2], &[]);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::LengthMismatch {
                declared: 24,
                actual: 16
            })
        );
        let bytes = encode_sample(&header(200, 0, 0), &[], &[]);
        assert_eq!(decode(&bytes), Err(DecodeError::TooManyFrames(200)));
        assert_eq!(decode(&[1]), Err(DecodeError::TooShort(1)));
        assert_eq!(decode(&[9, 0, 0, 0]), Err(DecodeError::UnknownKind(9)));
        assert!(matches!(
            decode(&bytes[..20]),
            Err(DecodeError::TooShort(20))
        ));
    }

    #[test]
    fn decodes_process_events() {
        let event = ProcessEvent {
            kind: RecordKind::ProcessExit as u16,
            _pad: 0,
            tgid: 7,
            ktime_ns: 5,
            comm: [0; COMM_LEN],
        };
        // SAFETY: ProcessEvent is repr(C) without padding.
        let bytes =
            unsafe { std::slice::from_raw_parts((&event as *const ProcessEvent).cast::<u8>(), 32) };
        assert_eq!(
            decode(bytes),
            Ok(Record::Exit {
                tgid: 7,
                ktime_ns: 5
            })
        );
    }

    fn decode_all(bytes: &[u8]) -> Vec<Result<Record, DecodeError>> {
        let mut out = Vec::new();
        decode_item(bytes, |r| out.push(r));
        out
    }

    #[test]
    fn decodes_every_sample_of_a_batch() {
        let samples = [
            encode_sample(&header(2, 1, 3), &[0x10, 0x20, 0xffff_0000], &[7, 8, 9]),
            encode_sample(&header(1, 0, 0), &[0x30], &[]),
            encode_sample(&header(0, 0, 5), &[], &[1, 2, 3, 4, 5]),
        ];
        let decoded = decode_all(&encode_batch(&samples));
        let single: Vec<_> = samples.iter().map(|s| decode(s)).collect();
        assert_eq!(decoded, single);
        assert!(decoded.iter().all(Result::is_ok));
        // A process event is one item of its own.
        assert_eq!(
            decode_all(&[9, 0, 0, 0]),
            vec![Err(DecodeError::UnknownKind(9))]
        );
    }

    #[test]
    fn a_bad_sample_in_a_batch_counts_it_and_every_one_after_it() {
        let good = encode_sample(&header(1, 0, 0), &[0x10], &[]);
        // Declares 100 frames and carries one: nothing after it can be found.
        let liar = encode_sample(&header(100, 0, 0), &[0x20], &[]);
        let mut batch = encode_batch(&[good.clone(), liar, good.clone(), good]);
        let decoded = decode_all(&batch);
        assert_eq!(decoded.len(), 4);
        assert!(decoded[0].is_ok());
        assert!(
            decoded[1..]
                .iter()
                .all(|r| matches!(r, Err(DecodeError::LengthMismatch { .. }))),
            "{decoded:?}"
        );
        // A header that promises more samples than the bytes hold.
        batch.truncate(8 + 64);
        let decoded = decode_all(&batch);
        assert_eq!(decoded.len(), 4);
        assert_eq!(decoded.iter().filter(|r| r.is_ok()).count(), 1);
        // Bytes after the last sample are reported, the samples kept.
        let mut batch = encode_batch(&[encode_sample(&header(1, 0, 0), &[0x10], &[])]);
        batch.extend_from_slice(&[0; 16]);
        let decoded = decode_all(&batch);
        assert!(decoded[0].is_ok());
        assert_eq!(decoded[1], Err(DecodeError::BatchTrailingBytes(16)));
        // A batch inside a batch is refused, not recursed into.
        let inner = encode_batch(&[encode_sample(&header(1, 0, 0), &[0x10], &[])]);
        let mut outer = encode_batch(&[]);
        outer[4] = 1;
        outer.extend_from_slice(&inner);
        outer.resize(8 + 56 + 8, 0);
        assert_eq!(decode_all(&outer), vec![Err(DecodeError::NestedBatch)]);
    }
}
