//! Recent successful logins, so that a client that logs in again and again (a POP3
//! poller every minute, IMAP clients opening several connections) costs one argon2
//! run per TTL, not one per login.
//!
//! An entry is a keyed BLAKE2b hash of (user, password, stored hash) under a key drawn
//! at start: no password is kept, the key never leaves the process, and a changed
//! password (a new stored hash) can never hit an old entry.

use blake2::digest::consts::U32;
use blake2::digest::{KeyInit, Mac};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

type Digest = [u8; 32];

pub(crate) struct Cache {
    key: [u8; 32],
    ttl: Duration,
    entries_max: usize,
    /// Entry → when it was stored.
    map: HashMap<Digest, Instant>,
    /// Entries in the order they were stored. The TTL is one for all, so the front is
    /// always the oldest: expiry and eviction both pop it (FIFO: a hit does not
    /// refresh an entry, so a password still gets checked once per TTL).
    order: VecDeque<(Digest, Instant)>,
}

impl Cache {
    pub(crate) fn new(ttl: Duration, entries_max: usize) -> std::io::Result<Cache> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Cache {
            key,
            ttl,
            entries_max,
            map: HashMap::new(),
            order: VecDeque::new(),
        })
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.entries_max > 0
    }

    pub(crate) fn digest(&self, user: &str, password: &[u8], phc: &str) -> Digest {
        let mut mac = blake2::Blake2bMac::<U32>::new_from_slice(&self.key)
            .expect("a 32-byte key fits BLAKE2b");
        // Length-prefixed, so that no two different triples feed the same bytes.
        for part in [user.as_bytes(), password, phc.as_bytes()] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    pub(crate) fn hit(&mut self, d: &Digest, now: Instant) -> bool {
        match self.map.get(d) {
            Some(at) if now.saturating_duration_since(*at) < self.ttl => true,
            Some(_) => {
                self.expire(now);
                false
            }
            None => false,
        }
    }

    pub(crate) fn insert(&mut self, d: Digest, now: Instant) {
        if !self.enabled() {
            return;
        }
        self.expire(now);
        if self.map.contains_key(&d) {
            // Two logins missed together and both verified: one entry is enough.
            return;
        }
        while self.map.len() >= self.entries_max {
            if !self.pop_front() {
                break;
            }
        }
        self.map.insert(d, now);
        self.order.push_back((d, now));
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((_, at)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            self.pop_front();
        }
    }

    /// Drops the oldest entry; false when there is none.
    fn pop_front(&mut self) -> bool {
        let Some((d, at)) = self.order.pop_front() else {
            return false;
        };
        // The map holds the entry's newest store time: an older position of a
        // re-stored entry is not the entry any more.
        if self.map.get(&d) == Some(&at) {
            self.map.remove(&d);
        }
        true
    }
}
