//! HTTP/3 "rapid reset" (CVE-2023-44487 over QUIC): a client that opens request streams and
//! cancels them at once. QUIC's MAX_STREAMS bounds the streams open at once, but a stream the
//! client cancels frees its credit as soon as its request task ends, while the upstream
//! request the task had started may still be running there: one connection could start
//! upstream requests as fast as it can send HEADERS and RESET_STREAM (measured: 5,000
//! upstream requests in 7 s from one connection to an upstream that answers in 500 ms, where
//! 128 streams of requests waiting for their responses make about 1,800). Counted here per
//! connection, as Envoy counts "premature resets", with Envoy's numbers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Request streams a connection must have ended before its share of cancelled ones is
/// judged (Envoy's `premature_reset_total_stream_count`): a client that cancels a few of its
/// first requests (a page navigated away from) is never judged on them alone.
pub(super) const MIN_STREAMS: u64 = 500;

/// A connection's request streams that have ended, and how many of them the client
/// cancelled (reset its request or stopped reading the response) before their response head.
#[derive(Default)]
pub(super) struct Cancels {
    ended: AtomicU64,
    cancelled: AtomicU64,
    /// Set by the stream that found the share excessive, so the close is counted once.
    tripped: AtomicBool,
}

/// What one ended stream makes of the connection.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Fine,
    /// At least `MIN_STREAMS` ended and half or more of them were cancelled: the connection
    /// is to be closed with H3_EXCESSIVE_LOAD (reported once, by the stream that tipped it).
    Excessive {
        ended: u64,
        cancelled: u64,
    },
}

impl Cancels {
    /// Counts one ended request stream, `cancelled` by the client before its response head.
    pub(super) fn ended(&self, cancelled: bool) -> Verdict {
        let ended = self.ended.fetch_add(1, Ordering::Relaxed) + 1;
        let cancelled = if cancelled {
            self.cancelled.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.cancelled.load(Ordering::Relaxed)
        };
        if ended >= MIN_STREAMS
            && cancelled.saturating_mul(2) >= ended
            && !self.tripped.swap(true, Ordering::Relaxed)
        {
            return Verdict::Excessive { ended, cancelled };
        }
        Verdict::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelling_every_stream_trips_at_min_streams_and_only_once() {
        let c = Cancels::default();
        for _ in 1..MIN_STREAMS {
            assert_eq!(c.ended(true), Verdict::Fine);
        }
        assert_eq!(
            c.ended(true),
            Verdict::Excessive {
                ended: MIN_STREAMS,
                cancelled: MIN_STREAMS
            }
        );
        assert_eq!(c.ended(true), Verdict::Fine);
    }

    #[test]
    fn a_client_that_cancels_less_than_half_is_never_judged_excessive() {
        let c = Cancels::default();
        // Two in five cancelled, for ten times the minimum.
        for i in 0..MIN_STREAMS * 10 {
            assert_eq!(c.ended(i % 5 < 2), Verdict::Fine, "stream {i}");
        }
    }

    #[test]
    fn half_cancelled_after_the_minimum_trips() {
        let c = Cancels::default();
        for _ in 0..MIN_STREAMS {
            assert_eq!(c.ended(false), Verdict::Fine);
        }
        let tripped = (0..MIN_STREAMS)
            .map(|_| c.ended(true))
            .position(|v| v != Verdict::Fine);
        assert_eq!(tripped, Some(MIN_STREAMS as usize - 1));
    }
}
