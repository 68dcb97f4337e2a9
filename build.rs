//! Release builds link the packet path's functions together, in the order
//! of `bench/hot-path.order` (see `scripts/hot_order.py`): a ping wakes each
//! end from idle with cold caches and TLBs, and the path scattered over the
//! binary's text cost every wake-up more code lines and pages.
//!
//! Needs lld, Rust's default linker on x86_64 Linux since 1.90; set
//! MESHTUN_NO_LINK_ORDER=1 to link in the compiler's order with another.

fn main() {
    println!("cargo:rerun-if-changed=bench/hot-path.order");
    println!("cargo:rerun-if-env-changed=MESHTUN_NO_LINK_ORDER");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if !release || !linux || std::env::var_os("MESHTUN_NO_LINK_ORDER").is_some() {
        return;
    }
    let order = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/hot-path.order");
    // A source tree without the bench (a packaged crate) links as usual.
    if !order.is_file() {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}", order.display());
    // A symbol the list names but the build lacks (renamed since the list
    // was made) is only left where the compiler put it.
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}
