//! A listener's connection limit (`limits.max_connections`), resizable by a reload.
//!
//! A semaphore with one permit per connection slot. Growing adds permits at once. Shrinking
//! takes the free permits away at once; what is still missing (more connections open than
//! the new limit) is a debt, paid by the next connections that close: their permits are
//! forgotten instead of returned. Open connections are never cut to meet a lower limit;
//! new ones wait (TCP) or are refused (QUIC) until the count is under it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    /// The configured limit. Changed only under `resize`.
    max: AtomicUsize,
    /// Permits still to forget as connections close (after a shrink).
    debt: AtomicUsize,
    /// Slots held by an admitted connection (not by an accept loop waiting for one).
    open: AtomicUsize,
    /// Serializes resizes.
    resizing: Mutex<()>,
}

/// One connection's slot; the slot is freed (or, while a shrink is being paid, retired)
/// when it drops. An accept loop takes one before it accepts (so that at the limit new
/// connections wait in the backlog); the connection counts as open from `admit`.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    limit: Arc<ConnectionLimit>,
    admitted: bool,
}

impl Slot {
    /// The slot is a connection's now: counted by `active`.
    pub fn admit(mut self) -> Slot {
        self.limit.open.fetch_add(1, Ordering::AcqRel);
        self.admitted = true;
        self
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.admitted {
            self.limit.open.fetch_sub(1, Ordering::AcqRel);
        }
        let paid = self
            .limit
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if let Some(permit) = self.permit.take() {
            if paid {
                permit.forget();
            }
        }
    }
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Arc<ConnectionLimit> {
        Arc::new(ConnectionLimit {
            permits: Arc::new(Semaphore::new(max)),
            max: AtomicUsize::new(max),
            debt: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            resizing: Mutex::new(()),
        })
    }

    /// Whether a shrink is still being paid for (more slots out than the limit allows).
    pub fn in_debt(&self) -> bool {
        self.debt.load(Ordering::Acquire) > 0
    }

    /// The configured limit.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Acquire)
    }

    /// A slot if one is free now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    /// Waits for a free slot.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        // The semaphore is never closed.
        let permit = self.permits.clone().acquire_owned().await;
        let permit = permit.expect("connection-limit semaphore is never closed");
        self.slot(permit)
    }

    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        Slot {
            permit: Some(permit),
            limit: self.clone(),
            admitted: false,
        }
    }

    /// Connections holding a slot (admitted ones: an accept loop's waiting slot is none).
    pub fn active(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Sets a new limit; returns the old one.
    pub fn resize(&self, new: usize) -> usize {
        let _serial = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.max.load(Ordering::Acquire);
        if new > old {
            // Cancel debt first: those permits are still out and will come back.
            let mut grow = new - old;
            let _ = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    let cancel = d.min(new - old);
                    grow = new - old - cancel;
                    Some(d - cancel)
                });
            self.permits.add_permits(grow);
        } else if new < old {
            // The debt is published first, so a connection closing meanwhile retires its
            // slot instead of handing it to a waiting accept.
            let shrink = old - new;
            self.debt.fetch_add(shrink, Ordering::AcqRel);
            let taken = self.permits.forget_permits(shrink);
            // Pay with the free permits taken; closes may have paid part of it meanwhile,
            // and what they paid for twice is given back.
            let mut excess = 0;
            let _ = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    let paid = taken.min(d);
                    excess = taken - paid;
                    Some(d - paid)
                });
            if excess > 0 {
                self.permits.add_permits(excess);
            }
        }
        self.max.store(new, Ordering::Release);
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinking_below_the_open_count_waits_for_closes() {
        let limit = ConnectionLimit::new(4);
        let mut slots: Vec<_> = (0..3)
            .map(|_| limit.try_acquire().unwrap().admit())
            .collect();
        assert_eq!(limit.active(), 3);
        assert_eq!(limit.resize(1), 4);
        assert_eq!(limit.active(), 3);
        assert!(limit.try_acquire().is_none());
        slots.pop();
        assert!(limit.try_acquire().is_none(), "still 2 open, limit 1");
        assert_eq!(limit.active(), 2);
        slots.pop();
        assert_eq!(limit.active(), 1);
        assert!(limit.try_acquire().is_none(), "1 open, limit 1");
        slots.pop();
        assert_eq!(limit.active(), 0);
        let one = limit.try_acquire().unwrap().admit();
        assert!(limit.try_acquire().is_none());
        assert_eq!(limit.active(), 1);
        drop(one);
        assert_eq!(limit.active(), 0);
        // A slot an accept loop holds while it waits is no connection.
        let waiting = limit.try_acquire().unwrap();
        assert_eq!(limit.active(), 0);
        drop(waiting.admit());
        assert_eq!(limit.active(), 0);
    }

    #[test]
    fn growing_cancels_debt_before_adding_slots() {
        let limit = ConnectionLimit::new(4);
        let slots: Vec<_> = (0..4)
            .map(|_| limit.try_acquire().unwrap().admit())
            .collect();
        limit.resize(2); // debt 2
        limit.resize(5); // debt 0, one new slot
        assert_eq!(limit.active(), 4);
        let fifth = limit.try_acquire().unwrap().admit();
        assert!(limit.try_acquire().is_none());
        drop(slots);
        drop(fifth);
        assert_eq!(limit.active(), 0);
        let all: Vec<_> = (0..5)
            .map(|_| limit.try_acquire().unwrap().admit())
            .collect();
        assert!(limit.try_acquire().is_none());
        assert_eq!(all.len(), 5);
    }

    #[tokio::test]
    async fn a_waiting_accept_gets_a_slot_when_the_limit_grows() {
        let limit = ConnectionLimit::new(1);
        let _held = limit.try_acquire().unwrap().admit();
        let waiter = {
            let limit = limit.clone();
            tokio::spawn(async move { limit.acquire().await.admit() })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        limit.resize(2);
        let slot = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiter gets the new slot")
            .unwrap();
        assert_eq!(limit.active(), 2);
        drop(slot);
        assert_eq!(limit.active(), 1);
    }
}

/// Connections open at once per client on one listener (`limits.max_connections_per_client`):
/// one client cannot take every slot of `max_connections` and starve the others (nginx's
/// `limit_conn` on `$binary_remote_addr`). A client is its address, an IPv6 one its /64 (a
/// host is handed a whole /64, and could spread over it). The map holds only clients with a
/// connection open, so it is bounded by `max_connections`.
#[derive(Default)]
pub struct PerClient(Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One connection's place in its client's count; given back when dropped.
pub struct ClientSlot {
    counts: Arc<PerClient>,
    client: std::net::IpAddr,
}

impl PerClient {
    /// A place for one more connection from `peer`, unless it has `max` open already.
    pub fn take(self: &Arc<Self>, peer: std::net::IpAddr, max: usize) -> Option<ClientSlot> {
        let client = client_of(peer);
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(client).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            counts: self.clone(),
            client,
        })
    }

    /// Connections open from `peer`'s client.
    pub fn open(&self, peer: std::net::IpAddr) -> usize {
        let counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&client_of(peer)).copied().unwrap_or(0)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::hash_map::Entry::Occupied(mut e) = counts.entry(self.client) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// The client a peer address counts for: an IPv4 address (also in its IPv6-mapped form) is
/// one client, an IPv6 address counts for its /64.
fn client_of(peer: std::net::IpAddr) -> std::net::IpAddr {
    match crate::proxy::headers::canonical(peer) {
        std::net::IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod per_client_tests {
    use super::*;

    #[test]
    fn a_client_gets_max_places_and_an_ipv6_client_is_its_64() {
        let counts = Arc::new(PerClient::default());
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let first = counts.take(a, 2).unwrap();
        let second = counts
            .take(mapped, 2)
            .expect("the same client, second place");
        assert!(counts.take(a, 2).is_none());
        assert!(counts.take("192.0.2.2".parse().unwrap(), 2).is_some());
        drop(first);
        let third = counts.take(a, 2).expect("a place came back");
        drop((second, third));
        assert_eq!(counts.open(a), 0);
        assert!(counts.0.lock().unwrap().is_empty(), "no client left behind");

        let x = counts.take("2001:db8:1:2::1".parse().unwrap(), 1).unwrap();
        assert!(counts
            .take("2001:db8:1:2:ffff::9".parse().unwrap(), 1)
            .is_none());
        assert!(counts.take("2001:db8:1:3::1".parse().unwrap(), 1).is_some());
        drop(x);
    }
}
