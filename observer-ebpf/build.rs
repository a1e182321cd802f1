fn main() {
    // bpf-linker is found through PATH; make a missing install a clear error up front.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        if which::which("bpf-linker").is_err() {
            panic!("bpf-linker not found on PATH: run `cargo xtask setup`");
        }
        println!("cargo:rerun-if-env-changed=PATH");
        // bpf-linker's default (`--bpf-expand-memcpy-in-order`) leaves every memset and
        // memmove to a call: a 3-byte key padding or a 16-byte address copy became a function
        // call in the per-packet path, and each call nests one more frame into the verifier's
        // 512-byte stack budget (32 bytes apiece before Linux 6.6). LLVM expands them inline
        // without it.
        println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
    }
}
