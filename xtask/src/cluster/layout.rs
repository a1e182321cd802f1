//! The cluster's names, addresses and paths live with the tests that use them.
pub use observer_tests::cluster::{Cni, Layout, Node, ProxyMode};
