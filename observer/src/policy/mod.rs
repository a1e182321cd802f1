//! NetworkPolicy (`networking.k8s.io/v1`): validation into a model, and the reference
//! semantics engine that decides and explains every (source, destination, protocol, port).
//!
//! Invalid policies: a policy with an invalid or unsupported field is reported (naming the
//! policy and the field) and never allows anything, but it still isolates the pods it selects in
//! the directions it declares. If even its `podSelector` is unusable it isolates every pod of its
//! namespace. Either way an invalid policy can only make traffic that valid policies allow be
//! denied, never the reverse: the failure is closed, and visible in `explain` and the logs.
pub mod compile;
pub mod engine;
pub mod incremental;
pub mod kernel;
pub mod matrix;
pub mod model;

pub use engine::{Decision, Engine, Options, Peer as EnginePeer, Side, Verdict};
pub use model::{Policy, PolicyError, Protocol};
