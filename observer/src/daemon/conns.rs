//! The daemon's per-connection state, and its pruning against the kernel's table.
use observer_common::CtKey;

/// Per-connection bookkeeping in userspace.
#[derive(Default)]
pub(super) struct Conn {
    /// Counters already added to the per-pod traffic metrics.
    pub counted: [u64; 4],
    /// The connection's SNAT, once joined with its translation.
    pub snat: Option<crate::snat::SnatInfo>,
    /// `snat` says untranslated because the kernel had no entry when looked up (its opening
    /// packet never left, e.g. a first SYN dropped on the way); a translation seen later
    /// corrects it.
    pub snat_assumed: bool,
    /// The Service it was opened to (and, from outside, the client before kube-proxy's
    /// masquerade), once read from the kernel's links.
    pub service: Option<(crate::flows::ServiceRef, Option<std::net::SocketAddr>)>,
    /// The read of the kernel's table under way when this state was made (see
    /// [`Conns::begin_read`]).
    read: u64,
}

impl Conn {
    /// Empty state, made while `read` was the latest read begun.
    fn made_in(read: u64) -> Conn {
        Conn {
            read,
            ..Conn::default()
        }
    }
}

/// Connections' state by key. Keyed with a fast hasher: every kernel event and the sweep's
/// pruning hash into it.
#[derive(Default)]
pub(super) struct Conns {
    map: foldhash::HashMap<CtKey, Conn>,
    /// Reads of the kernel's table begun so far.
    reads: u64,
}

impl Conns {
    pub fn get(&self, key: &CtKey) -> Option<&Conn> {
        self.map.get(key)
    }

    /// The connection's state, made empty if it has none.
    pub fn at(&mut self, key: &CtKey) -> &mut Conn {
        let read = self.reads;
        self.map.entry(*key).or_insert_with(|| Conn::made_in(read))
    }

    /// A reused tuple starts over: its state, if it has any, is emptied.
    pub fn restart(&mut self, key: &CtKey) {
        if let Some(c) = self.map.get_mut(key) {
            *c = Conn::made_in(self.reads);
        }
    }

    pub fn remove(&mut self, key: &CtKey) {
        self.map.remove(key);
    }

    /// Marks the start of a read of the kernel's table whose keys will [`prune`](Self::prune)
    /// this state; returns the read's mark.
    pub fn begin_read(&mut self) -> u64 {
        self.reads += 1;
        self.reads
    }

    /// Keeps the state of connections the read found (`live`), and of those made since the read
    /// began: the read passes each bucket once, so a connection opened behind it is not in
    /// `live`, yet its `new` record may have left its Service and SNAT here already.
    pub fn prune(&mut self, read: u64, live: impl Fn(&CtKey) -> bool) {
        self.map.retain(|k, c| c.read >= read || live(k));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> CtKey {
        CtKey {
            port_a: port,
            ..Default::default()
        }
    }

    #[test]
    fn pruning_keeps_what_the_read_found_and_what_came_after_it_began() {
        let mut conns = Conns::default();
        conns.at(&key(1)).counted = [1; 4]; // found by the read
        conns.at(&key(2)).counted = [2; 4]; // gone from the kernel (evicted)
        conns.at(&key(5)).counted = [5; 4]; // reused during the read
        let read = conns.begin_read();
        // Opened while the read ran, behind it: its state must survive.
        conns.at(&key(3)).counted = [3; 4];
        conns.restart(&key(5));
        conns.prune(read, |k| k.port_a == 1);
        assert_eq!(conns.get(&key(1)).map(|c| c.counted), Some([1; 4]));
        assert!(
            conns.get(&key(2)).is_none(),
            "an evicted connection's state stays"
        );
        assert_eq!(conns.get(&key(3)).map(|c| c.counted), Some([3; 4]));
        assert_eq!(conns.get(&key(5)).map(|c| c.counted), Some([0; 4]));
        assert_eq!(conns.len(), 3);

        // The next read prunes what it does not find, whenever it was made.
        let read = conns.begin_read();
        conns.prune(read, |k| k.port_a == 3);
        assert!(conns.get(&key(1)).is_none() && conns.get(&key(5)).is_none());
        assert_eq!(conns.len(), 1);
    }
}
