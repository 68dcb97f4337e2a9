//! Runs `tests/packaging.sh`: builds the .deb and .rpm, installs the .deb on
//! this machine, upgrades it over itself (the edited config and the identity
//! must survive), removes it, and checks the .rpm with `rpm -qp`.
//!
//! It changes the machine (dpkg -i, apt-get install rpm man-db), so it runs
//! only as root with `MESHTUN_PACKAGING_TEST=1`; otherwise it says why it
//! skips and passes. The packages are built in their own target directory
//! (target/packaging) so the nested cargo never waits on this one's lock.

use std::path::Path;
use std::process::Command;

#[test]
fn packages_build_install_upgrade_and_remove_cleanly() {
    if std::env::var("MESHTUN_PACKAGING_TEST").as_deref() != Ok("1") {
        eprintln!("skipping: set MESHTUN_PACKAGING_TEST=1 (as root) to build, install and remove the .deb and check the .rpm");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root (dpkg -i); MESHTUN_PACKAGING_TEST=1 is set but this is not root");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new("bash")
        .arg("tests/packaging.sh")
        .current_dir(root)
        .env("CARGO_TARGET_DIR", root.join("target/packaging"))
        .status()
        .expect("cannot run bash tests/packaging.sh");
    assert!(status.success(), "tests/packaging.sh failed ({status}); its output above says which check");
}
