//! Rapid reset (CVE-2023-44487), over HTTP/2 and HTTP/3 alike: a client that opens request
//! streams and cancels them at once makes the gateway start their requests (routing, policy,
//! an upstream request) for the price of two frames. `max_concurrent_streams` does not bound
//! it: a cancelled stream gives its credit back as soon as the gateway lets go of it, while
//! the upstream request it started may still be running (measured before this limit: 3,148
//! upstream requests from 5,000 HTTP/2 streams, 5,000 in 7 s from one HTTP/3 connection).
//!
//! One account per connection, Envoy's rule and numbers (`overload.premature_reset_*`): a
//! stream the client cancels before its response head, within `PREMATURE_AGE` of opening it,
//! is a premature reset; once they are more than half of the connection's streams, counted
//! over at least `MIN_STREAMS` or four times `max_concurrent_streams` when that is more, the
//! connection is closed (HTTP/2: GOAWAY `ENHANCE_YOUR_CALM`; HTTP/3: `H3_EXCESSIVE_LOAD`).
//! A browser leaving a page cancels at most every stream it has open, and may do so twice,
//! without coming near it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A cancellation later than this after the stream opened is not premature: the client
/// waited for an answer (a slow upstream) rather than threw the stream away.
pub const PREMATURE_AGE: Duration = Duration::from_secs(1);

/// The streams premature resets are judged over at least (Envoy's
/// `premature_reset_total_stream_count`), so that a client cancelling a few of its first
/// requests is never judged on them alone.
pub const MIN_STREAMS: u64 = 500;

/// One connection's request streams and premature resets.
#[derive(Debug)]
pub struct PrematureResets {
    opened: AtomicU64,
    premature: AtomicU64,
    /// `MIN_STREAMS`, or four times the connection's `max_concurrent_streams` when more.
    judged_over: u64,
    /// Set by the reset that found the limit passed: the connection is closed (and counted)
    /// once.
    tripped: AtomicBool,
}

impl PrematureResets {
    /// The account of a connection allowed `max_concurrent_streams` at once.
    pub fn new(max_concurrent_streams: u32) -> PrematureResets {
        PrematureResets {
            opened: AtomicU64::new(0),
            premature: AtomicU64::new(0),
            judged_over: MIN_STREAMS.max(4 * u64::from(max_concurrent_streams)),
            tripped: AtomicBool::new(false),
        }
    }

    /// Counts a request stream that reached the gateway's service.
    pub fn opened(&self) {
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a stream the client cancelled before its response head, `age` after it
    /// opened. True for the one reset that takes the connection past the limit: the caller
    /// closes the connection and accounts for it.
    pub fn cancelled(&self, age: Duration) -> bool {
        if age >= PREMATURE_AGE {
            return false;
        }
        let premature = self.premature.fetch_add(1, Ordering::Relaxed) + 1;
        let opened = self.opened.load(Ordering::Relaxed);
        premature.saturating_mul(2) > opened.max(self.judged_over)
            && !self.tripped.swap(true, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YOUNG: Duration = Duration::from_millis(1);

    /// Opens and cancels `n` streams; the index of the one that tripped, if one did.
    fn open_and_cancel(r: &PrematureResets, n: u64, age: Duration) -> Option<u64> {
        (0..n).find(|_| {
            r.opened();
            r.cancelled(age)
        })
    }

    #[test]
    fn cancelling_every_stream_trips_past_half_of_the_minimum_and_only_once() {
        let r = PrematureResets::new(100);
        assert_eq!(open_and_cancel(&r, 1000, YOUNG), Some(MIN_STREAMS / 2));
        assert_eq!(open_and_cancel(&r, 1000, YOUNG), None);
    }

    #[test]
    fn the_minimum_grows_with_max_concurrent_streams() {
        let r = PrematureResets::new(1000);
        assert_eq!(open_and_cancel(&r, 10_000, YOUNG), Some(2000));
    }

    #[test]
    fn a_client_that_cancels_less_than_half_is_never_judged_excessive() {
        let r = PrematureResets::new(128);
        // Two in five cancelled, for twenty times the minimum.
        for i in 0..MIN_STREAMS * 20 {
            r.opened();
            if i % 5 < 2 {
                assert!(!r.cancelled(YOUNG), "stream {i}");
            }
        }
    }

    #[test]
    fn cancellations_after_premature_age_do_not_count() {
        let r = PrematureResets::new(128);
        assert_eq!(open_and_cancel(&r, 10_000, PREMATURE_AGE), None);
    }

    #[test]
    fn a_browser_cancelling_everything_it_has_open_twice_is_not_cut() {
        // 128 streams cancelled, a page, 128 cancelled again: 256 of 257 streams.
        let r = PrematureResets::new(128);
        assert_eq!(open_and_cancel(&r, 128, YOUNG), None);
        r.opened();
        assert_eq!(open_and_cancel(&r, 128, YOUNG), None);
    }
}
