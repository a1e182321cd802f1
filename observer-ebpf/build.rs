fn main() {
    // bpf-linker is found through PATH; make a missing install a clear error up front.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        if which::which("bpf-linker").is_err() {
            panic!("bpf-linker not found on PATH: run `cargo xtask setup`");
        }
        println!("cargo:rerun-if-env-changed=PATH");
    }
}
