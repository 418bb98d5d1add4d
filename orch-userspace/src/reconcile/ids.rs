//! Ids for services and backends: the index of each in the data plane's arrays.

use std::collections::{BTreeSet, VecDeque};

/// Dense ids below a capacity: fresh ids first, then freed ones, oldest first.
#[derive(Debug)]
pub(super) struct IdPool {
    pub(super) max: u32,
    next: u32,
    free: VecDeque<u32>,
}

impl IdPool {
    pub(super) fn new(max: u32) -> Self {
        IdPool {
            max,
            next: 0,
            free: VecDeque::new(),
        }
    }

    /// A pool in which exactly `used` are taken (ids at or above `max` are ignored).
    pub(super) fn with_used(max: u32, used: &BTreeSet<u32>) -> Self {
        let next = used.range(..max).next_back().map_or(0, |&id| id + 1);
        IdPool {
            max,
            next,
            free: (0..next).filter(|id| !used.contains(id)).collect(),
        }
    }

    pub(super) fn in_use(&self) -> usize {
        self.next as usize - self.free.len()
    }

    /// Callers check capacity first (`in_use` + needed <= `max`), so this cannot fail.
    pub(super) fn alloc(&mut self) -> u32 {
        if self.next < self.max {
            self.next += 1;
            self.next - 1
        } else {
            self.free.pop_front().expect("capacity was checked")
        }
    }

    pub(super) fn release(&mut self, id: u32) {
        self.free.push_back(id);
    }
}
