//! Kernel programs live in the `observer` binary target; this library exists so the userspace
//! crate can name the package as a build dependency (cargo then rebuilds it on changes).
#![no_std]
