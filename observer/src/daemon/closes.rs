//! Closed connections: the kernel sends a TCP close's event with its final counters (at the RST,
//! or at the last ACK after FINs both ways), and its record goes out at once. The entry itself
//! stays in the kernel's table for the sweep to remove ([`CLOSED_LINGER`]), so late packets of
//! the connection still find it; a close whose event never came the sweep publishes.
use super::*;

/// How long a closed connection's entry stays in the kernel's table after its last packet:
/// retransmitted FINs and the final ACKs still belong to it, not to a new connection that
/// policy would judge again. Cilium keeps closing entries as long.
pub(super) const CLOSED_LINGER: Duration = Duration::from_secs(10);

/// A close event from the ring.
pub(super) fn close_seen(shared: &Shared, key: CtKey, entry: CtEntry) {
    // The sweep published it already: its last ACK came after `--close-grace`.
    if shared
        .state
        .lock()
        .unwrap()
        .late_closes
        .contains(&(key, entry.first_seen_ns))
    {
        return;
    }
    publish_close(shared, &key, &entry);
}

pub(super) fn publish_close(shared: &Shared, key: &CtKey, e: &CtEntry) {
    emit(shared, EventKind::Close, key, e);
    // After the record: it accounts the connection's last counters against this state.
    shared.state.lock().unwrap().conns.remove(key);
}
