//! Network-namespace lab for end-to-end tests.
//!
//! * [`Lab`] owns everything a test creates: network namespaces (named
//!   `mt-{pid}-{test}-{role}`), processes spawned inside them and a temp dir
//!   (`/tmp/mt-{pid}-{test}/`). Its `Drop` stops every process it started
//!   (SIGTERM, then SIGKILL after a grace period, by PID only), deletes every
//!   namespace and verifies `/run/netns` no longer has them — also when the
//!   test panics (then it prints the tail of each process log and keeps the
//!   temp dir for inspection).
//! * [`Ns`]: `exec` (`ip netns exec`, with a timeout), `spawn` (registered for
//!   cleanup), `in_netns` (run a closure on a thread that `setns`'d into the
//!   namespace, so sockets created there belong to it).
//! * [`Capture`]: AF_PACKET capture in a background thread.
//! * [`wait_until`]: polling with a panic message naming what was awaited and
//!   the last observed state.
//!
//! All addresses used by the tests are in 198.18.0.0/15; all traffic stays
//! inside namespaces the lab created.
#![allow(dead_code)]

pub mod meshtun;
pub mod nat;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Read};
use std::mem::MaybeUninit;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};

/// Default timeout of [`Ns::exec`] and friends.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace period between SIGTERM and SIGKILL when the lab cleans up.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// root / skipping
// ---------------------------------------------------------------------------

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Environment variables that turn a missing-root skip into a failure: CI
/// runs the suite as root, so a skip there means the lab silently did not run.
pub const REQUIRE_ROOT_VARS: [&str; 2] = ["CI", "MESHTUN_REQUIRE_ROOT"];

/// The variable (from [`REQUIRE_ROOT_VARS`]) that forbids skipping, if any is
/// set to something other than empty, `0` or `false`.
pub fn skip_forbidden_by(lookup: impl Fn(&str) -> Option<String>) -> Option<&'static str> {
    REQUIRE_ROOT_VARS.into_iter().find(|var| match lookup(var) {
        Some(v) => {
            let v = v.trim();
            !(v.is_empty() || v == "0" || v.eq_ignore_ascii_case("false"))
        }
        None => false,
    })
}

/// Returns `true` when the test can run. When not root it prints a clear
/// "skipping: needs root" line and returns `false`: the caller returns and
/// the test passes, unless `CI` or `MESHTUN_REQUIRE_ROOT` is set, where it
/// panics instead. When root, missing tools are a failure, not a skip.
pub fn require_root(test: &str) -> bool {
    if !is_root() {
        if let Some(var) = skip_forbidden_by(|v| std::env::var(v).ok()) {
            panic!("{test}: needs root (network namespaces, veth, TUN) and {var} is set, so it may not skip; run as root or unset {var}");
        }
        println!("skipping {test}: needs root (network namespaces, veth, TUN)");
        eprintln!("skipping {test}: needs root (network namespaces, veth, TUN)");
        return false;
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("ip").is_file()))
        .unwrap_or(false);
    assert!(found, "{test}: running as root but `ip` is not on PATH (install iproute2)");
    true
}

#[test]
fn ci_or_meshtun_require_root_forbids_skipping_but_unset_or_false_allows_it() {
    let env = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
    assert_eq!(skip_forbidden_by(env(&[])), None);
    assert_eq!(skip_forbidden_by(env(&[("CI", "true")])), Some("CI"));
    assert_eq!(skip_forbidden_by(env(&[("MESHTUN_REQUIRE_ROOT", "1")])), Some("MESHTUN_REQUIRE_ROOT"));
    assert_eq!(skip_forbidden_by(env(&[("CI", "false"), ("MESHTUN_REQUIRE_ROOT", "")])), None);
    assert_eq!(skip_forbidden_by(env(&[("CI", "0"), ("MESHTUN_REQUIRE_ROOT", "yes")])), Some("MESHTUN_REQUIRE_ROOT"));
}

/// Panics with a clear message unless `tool` is on PATH.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "`{tool}` is not on PATH: install the `{package}` package (apt-get install --no-install-recommends {package})");
}

// ---------------------------------------------------------------------------
// waiting
// ---------------------------------------------------------------------------

/// Polls `poll` every 100 ms until it returns `Ok`, and returns that value.
/// `Err(state)` describes what was observed; after `timeout` this panics with
/// "timed out after .. waiting for {what}; last observed: {state}".
pub fn wait_until<T>(timeout: Duration, what: &str, poll: impl FnMut() -> Result<T, String>) -> T {
    poll_until(timeout, what, poll).unwrap_or_else(|e| panic!("{e}"))
}

/// Non-panicking [`wait_until`]: `Err` holds the same message.
pub fn poll_until<T>(
    timeout: Duration,
    what: &str,
    mut poll: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        let last = match poll() {
            Ok(v) => return Ok(v),
            Err(state) => state,
        };
        if start.elapsed() >= timeout {
            return Err(format!(
                "timed out after {:.1?} waiting for {what}; last observed state: {last}",
                start.elapsed()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Collects failed checks so a test can report every independent failure of
/// a run, then fail once in [`Checks::finish`].
#[derive(Default)]
pub struct Checks {
    failed: Vec<String>,
}

impl Checks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a failure (printed at once) unless `ok`; returns `ok`.
    pub fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) -> bool {
        if !ok {
            let m = msg();
            eprintln!("CHECK FAILED: {m}");
            self.failed.push(m);
        }
        ok
    }

    /// Records `Err` as a failure; returns the value if `Ok`.
    pub fn ok<T>(&mut self, r: Result<T, String>, context: &str) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.check(false, || format!("{context}: {e}"));
                None
            }
        }
    }

    pub fn failures(&self) -> &[String] {
        &self.failed
    }

    /// Panics listing every failed check.
    pub fn finish(self) {
        if !self.failed.is_empty() {
            let list: Vec<String> = self.failed.iter().map(|f| format!("- {f}")).collect();
            panic!("{} check(s) failed:\n{}", self.failed.len(), list.join("\n"));
        }
    }
}

// ---------------------------------------------------------------------------
// commands with a timeout
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct CmdOutput {
    pub cmdline: String,
    /// `None` when the command was killed after timing out.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub fn describe(&self) -> String {
        let how = match (self.timed_out, self.status) {
            (true, _) => "timed out (killed)".to_string(),
            (false, Some(s)) => describe_status(s),
            (false, None) => "did not finish".to_string(),
        };
        format!(
            "`{}` {} after {:.0?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            how,
            self.elapsed,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    /// Panics with the full output unless the command exited 0.
    pub fn ok(self) -> Self {
        assert!(self.success(), "command failed: {}", self.describe());
        self
    }
}

pub fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended with {s:?}"),
    }
}

fn cmdline_of(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion (stdin null, output captured); kills it (by its
/// PID) after `timeout`.
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let cmdline = cmdline_of(cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start `{cmdline}`: {e}"));
    let out_rx = drain(child.stdout.take().expect("piped stdout"));
    let err_rx = drain(child.stderr.take().expect("piped stderr"));
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) => {}
            Err(e) => panic!("waiting for `{cmdline}`: {e}"),
        }
        if start.elapsed() >= timeout {
            timed_out = true;
            let _ = child.kill(); // our own child, by PID
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    let take = |rx: mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(2))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|_| "<output still held open by a grandchild>".into())
    };
    CmdOutput {
        cmdline,
        status,
        stdout: take(out_rx),
        stderr: take(err_rx),
        elapsed,
        timed_out,
    }
}

fn drain<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// `ip ARGS...` in the root namespace (used for `ip netns add/del`, `ip -n`).
pub fn ip(args: &[&str]) -> CmdOutput {
    run_cmd(Command::new("ip").args(args), EXEC_TIMEOUT)
}

// ---------------------------------------------------------------------------
// processes
// ---------------------------------------------------------------------------

struct ProcInner {
    label: String,
    cmdline: String,
    pid: u32,
    child: Mutex<Child>,
    exit: Mutex<Option<ExitStatus>>,
    log: PathBuf,
}

/// A long-running process started by the lab. Cloning shares the handle.
#[derive(Clone)]
pub struct Proc(Arc<ProcInner>);

impl Proc {
    pub fn label(&self) -> &str {
        &self.0.label
    }

    pub fn pid(&self) -> u32 {
        self.0.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.0.log
    }

    /// Exit status if it has exited (reaps it), `None` while running.
    pub fn try_status(&self) -> Option<ExitStatus> {
        let mut exit = self.0.exit.lock().unwrap();
        if exit.is_none() {
            if let Ok(Some(s)) = self.0.child.lock().unwrap().try_wait() {
                *exit = Some(s);
            }
        }
        *exit
    }

    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Sends `sig` to this process only. Refuses (returns false) once it has
    /// been reaped, so a recycled PID can never be hit: the child is not
    /// reaped while we hold its lock.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        let mut exit = self.0.exit.lock().unwrap();
        let mut child = self.0.child.lock().unwrap();
        if exit.is_some() {
            return false;
        }
        if let Ok(Some(s)) = child.try_wait() {
            *exit = Some(s);
            return false;
        }
        // SAFETY: plain kill(2) on the PID of our own, not yet reaped child.
        unsafe { libc::kill(self.0.pid as libc::pid_t, sig) == 0 }
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; finally SIGKILL whatever is left
    /// of its process group (its descendants). Returns the exit status and
    /// whether SIGKILL was needed for the process itself.
    pub fn terminate(&self, grace: Duration) -> (Option<ExitStatus>, bool) {
        let mut killed = false;
        let mut status = self.try_status();
        if status.is_none() {
            self.signal(libc::SIGTERM);
            status = self.wait_timeout(grace);
            if status.is_none() {
                self.signal(libc::SIGKILL);
                killed = true;
                status = self.wait_timeout(Duration::from_secs(5));
            }
        }
        self.kill_group_leftovers();
        (status, killed)
    }

    /// SIGKILLs the members of this process's group (pgid = its pid). A pgid
    /// in use cannot be recycled as a new PID, so this only reaches our own
    /// descendants; ESRCH (no members) is the normal case.
    pub fn kill_group_leftovers(&self) {
        // SAFETY: kill(2) on the negated pgid of a group we created.
        unsafe {
            libc::kill(-(self.0.pid as libc::pid_t), libc::SIGKILL);
        }
    }

    pub fn log(&self) -> String {
        std::fs::read(&self.0.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.0.log.display()))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Panics (with its log tail) if the process has exited.
    pub fn assert_running(&self, context: &str) {
        if let Some(s) = self.try_status() {
            panic!(
                "{}: process `{}` (pid {}) {} unexpectedly\n`{}`\n--- last log lines ---\n{}",
                context,
                self.0.label,
                self.0.pid,
                describe_status(s),
                self.0.cmdline,
                self.log_tail(40)
            );
        }
    }

    /// `Err(state)` if it has exited, for use inside [`wait_until`] polls.
    pub fn check_running(&self) -> Result<(), String> {
        match self.try_status() {
            None => Ok(()),
            Some(s) => Err(format!(
                "process `{}` {}; last log lines:\n{}",
                self.0.label,
                describe_status(s),
                self.log_tail(20)
            )),
        }
    }
}

#[derive(Default)]
struct Registry {
    procs: Mutex<Vec<Proc>>,
}

// ---------------------------------------------------------------------------
// namespaces
// ---------------------------------------------------------------------------

/// A network namespace created by a [`Lab`].
#[derive(Clone)]
pub struct Ns {
    name: String,
    role: String,
    registry: Arc<Registry>,
    logdir: PathBuf,
}

impl Ns {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn role(&self) -> &str {
        &self.role
    }

    /// `ip netns exec NAME program args...`
    pub fn command<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program).args(args);
        c
    }

    /// Runs `args[0] args[1..]` inside the namespace with [`EXEC_TIMEOUT`].
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> CmdOutput {
        self.exec_timeout(args, EXEC_TIMEOUT)
    }

    pub fn exec_timeout<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> CmdOutput {
        assert!(!args.is_empty(), "exec needs a program");
        run_cmd(&mut self.command(&args[0], &args[1..]), timeout)
    }

    /// Like [`Ns::exec`] but panics unless it exits 0; returns stdout.
    pub fn exec_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        self.exec(args).ok().stdout
    }

    /// Starts a long-running process inside the namespace; stdout+stderr go to
    /// `{lab dir}/{label}.log`. The lab stops it on drop. The PID is the
    /// program's own: `ip netns exec` execs it without forking.
    pub fn spawn<S: AsRef<OsStr>>(&self, label: &str, args: &[S]) -> Proc {
        self.spawn_env(label, args, &[])
    }

    pub fn spawn_env<S: AsRef<OsStr>>(&self, label: &str, args: &[S], env: &[(&str, &str)]) -> Proc {
        assert!(!args.is_empty(), "spawn needs a program");
        let log = self.logdir.join(format!("{label}.log"));
        let out = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log fd");
        let mut cmd = self.command(&args[0], &args[1..]);
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // If the test process dies without unwinding (SIGKILL, abort), take the
        // daemon down with it. PDEATHSIG fires when the spawning *thread*
        // exits, so spawn from the test thread (which also drops the Lab).
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
                // Own process group (pgid = pid), so cleanup can also reach
                // anything the program forks.
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let cmdline = cmdline_of(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("could not start `{cmdline}`: {e}"));
        let p = Proc(Arc::new(ProcInner {
            label: label.to_string(),
            cmdline,
            pid: child.id(),
            child: Mutex::new(child),
            exit: Mutex::new(None),
            log,
        }));
        self.registry.procs.lock().unwrap().push(p.clone());
        p
    }

    /// Runs `f` on a new thread that has joined this namespace (sockets it
    /// creates belong here) and returns its result (re-raising its panic).
    pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        in_netns(&self.name, f)
    }

    /// Like [`Ns::in_netns`] but in the background.
    pub fn spawn_in_netns<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        f: F,
    ) -> JoinHandle<T> {
        spawn_in_netns(&self.name, f)
    }

    /// Does `dev` exist in this namespace?
    pub fn link_exists(&self, dev: &str) -> bool {
        ip(&["-n", &self.name, "link", "show", "dev", dev]).success()
    }

    /// Inode of the namespace (compare with /proc/PID/ns/net).
    pub fn inode(&self) -> u64 {
        std::fs::metadata(netns_path(&self.name))
            .unwrap_or_else(|e| panic!("stat {}: {e}", netns_path(&self.name).display()))
            .ino()
    }
}

/// Removes [`ETC_NETNS`] if it holds nothing but [`ETC_NETNS_MARKER`].
pub fn remove_etc_netns_if_ours_and_unused() {
    let etc = Path::new(ETC_NETNS);
    let Ok(entries) = std::fs::read_dir(etc) else { return };
    let names: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    if names.len() == 1 && names[0] == ETC_NETNS_MARKER {
        let _ = std::fs::remove_file(etc.join(ETC_NETNS_MARKER));
        // Fails harmlessly if someone added an entry meanwhile.
        let _ = std::fs::remove_dir(etc);
    }
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn open_netns(name: &str) -> File {
    File::open(netns_path(name))
        .unwrap_or_else(|e| panic!("open {}: {e}", netns_path(name).display()))
}

fn enter(name: &str, f: File) {
    setns(&f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns into {name}: {e}"));
}

/// Runs `f` on a new thread after `setns(/run/netns/NAME, CLONE_NEWNET)`.
/// The closure may borrow; its panic is propagated.
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(ns_name: &str, f: F) -> T {
    let file = open_netns(ns_name);
    let name = ns_name.to_string();
    let res = thread::scope(|s| {
        thread::Builder::new()
            .name(format!("netns:{name}"))
            .spawn_scoped(s, move || {
                enter(&name, file);
                f()
            })
            .expect("spawn thread")
            .join()
    });
    res.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Background version of [`in_netns`].
pub fn spawn_in_netns<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
    ns_name: &str,
    f: F,
) -> JoinHandle<T> {
    let file = open_netns(ns_name);
    let name = ns_name.to_string();
    thread::Builder::new()
        .name(format!("netns:{name}"))
        .spawn(move || {
            enter(&name, file);
            f()
        })
        .expect("spawn thread")
}

/// A namespace holding a Linux bridge.
#[derive(Clone)]
pub struct Switch {
    pub ns: Ns,
    pub bridge: String,
}

// ---------------------------------------------------------------------------
// the lab
// ---------------------------------------------------------------------------

pub struct Lab {
    prefix: String,
    dir: PathBuf,
    namespaces: Mutex<Vec<String>>,
    registry: Arc<Registry>,
    /// `/etc/netns/NAME` directories written by [`Lab::set_resolv_conf`].
    etc_netns: Mutex<Vec<PathBuf>>,
}

/// Where `ip netns exec NAME` finds per-namespace files that it bind-mounts
/// over `/etc` (e.g. `/etc/netns/NAME/resolv.conf`).
pub const ETC_NETNS: &str = "/etc/netns";
/// Written into [`ETC_NETNS`] by whoever created that directory (a lab, or
/// `scripts/fleet-demo.sh`): whoever cleans up last, in any process, removes
/// the directory once nothing but this marker is left. A pre-existing
/// `/etc/netns` has no marker and is never removed.
pub const ETC_NETNS_MARKER: &str = ".created-by-meshtun";

impl Lab {
    /// `short` names the test (keep it short: it is part of every namespace
    /// name). Creates `/tmp/mt-{pid}-{short}/` (emptied if left over).
    pub fn new(short: &str) -> Lab {
        assert!(
            short.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "lab name must be [A-Za-z0-9-]"
        );
        let prefix = format!("mt-{}-{}", std::process::id(), short);
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Lab {
            prefix,
            dir,
            namespaces: Mutex::new(Vec::new()),
            registry: Arc::new(Registry::default()),
            etc_netns: Mutex::new(Vec::new()),
        }
    }

    /// Writes `/etc/netns/{ns}/resolv.conf` with one `nameserver` line per
    /// entry of `nameservers`: programs run through [`Ns::exec`] / `ip netns
    /// exec` (getent, curl, anything using the system resolver) then resolve
    /// through them. The directory is removed when the lab is dropped (and
    /// `/etc/netns` too if a lab or the fleet demo created it and nothing
    /// else is left in it, see [`ETC_NETNS_MARKER`]).
    pub fn set_resolv_conf(&self, ns: &Ns, nameservers: &[std::net::IpAddr]) {
        let etc = Path::new(ETC_NETNS);
        if !etc.exists() && std::fs::create_dir(etc).is_ok() {
            let _ = std::fs::write(etc.join(ETC_NETNS_MARKER), b"");
        }
        let dir = etc.join(ns.name());
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        {
            let mut dirs = self.etc_netns.lock().unwrap();
            if !dirs.contains(&dir) {
                dirs.push(dir.clone());
            }
        }
        let mut text = String::new();
        for n in nameservers {
            let _ = writeln!(text, "nameserver {n}");
        }
        let _ = writeln!(text, "options timeout:2 attempts:1");
        let file = dir.join("resolv.conf");
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The per-test temp dir (control sockets, state dirs, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn ns_name(&self, role: &str) -> String {
        format!("{}-{}", self.prefix, role)
    }

    /// Names of the namespaces created so far.
    pub fn namespace_names(&self) -> Vec<String> {
        self.namespaces.lock().unwrap().clone()
    }

    /// Creates namespace `mt-{pid}-{test}-{role}` with `lo` up.
    pub fn add_ns(&self, role: &str) -> Ns {
        let name = self.ns_name(role);
        if netns_path(&name).exists() {
            // Only possible as a leftover of an earlier run of a process that
            // had our PID (the name embeds it): ours to remove.
            let _ = ip(&["netns", "del", &name]);
        }
        ip(&["netns", "add", &name]).ok();
        self.namespaces.lock().unwrap().push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]).ok();
        Ns {
            name,
            role: role.to_string(),
            registry: self.registry.clone(),
            logdir: self.dir.clone(),
        }
    }

    /// Creates a namespace holding bridge `bridge` (STP off, up).
    pub fn add_switch(&self, role: &str, bridge: &str) -> Switch {
        let ns = self.add_ns(role);
        let n = ns.name().to_string();
        // No IPv6 chatter (RS/MLD/DAD) from the switch itself.
        let _ = ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
        let _ = ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"]);
        ip(&["-n", &n, "link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"]).ok();
        ip(&["-n", &n, "link", "set", bridge, "up"]).ok();
        Switch {
            ns,
            bridge: bridge.to_string(),
        }
    }

    /// Creates veth `host_if` in `host` whose peer `p{role}` sits in the
    /// switch namespace as a bridge port, and assigns `cidr` (if any).
    pub fn connect(&self, host: &Ns, host_if: &str, sw: &Switch, cidr: Option<&str>) {
        let mut port = format!("p{}", host.role());
        port.truncate(15);
        ip(&[
            "link", "add", host_if, "netns", host.name(), "type", "veth", "peer", "name", &port,
            "netns", sw.ns.name(),
        ])
        .ok();
        ip(&["-n", sw.ns.name(), "link", "set", &port, "master", &sw.bridge]).ok();
        ip(&["-n", sw.ns.name(), "link", "set", &port, "up"]).ok();
        if let Some(cidr) = cidr {
            ip(&["-n", host.name(), "addr", "add", cidr, "dev", host_if]).ok();
        }
        ip(&["-n", host.name(), "link", "set", host_if, "up"]).ok();
    }

    /// `add_ns(role)` + `connect(.., "eth0", sw, Some(cidr))`.
    pub fn add_host(&self, role: &str, sw: &Switch, cidr: &str) -> Ns {
        let ns = self.add_ns(role);
        self.connect(&ns, "eth0", sw, Some(cidr));
        ns
    }

    /// Every process the lab started.
    pub fn procs(&self) -> Vec<Proc> {
        self.registry.procs.lock().unwrap().clone()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        let mut report = String::new();
        // 1. Stop every process we started, by PID, last started first (so
        //    nodes leave while their backbone still runs).
        let procs = std::mem::take(&mut *self.registry.procs.lock().unwrap());
        for p in procs.iter().rev() {
            let (status, killed) = p.terminate(TERM_GRACE);
            {
                let st = status.map(describe_status).unwrap_or_else(|| "did not exit".into());
                if killed {
                    let _ = writeln!(report, "lab cleanup: `{}` (pid {}) ignored SIGTERM for {:?}, SIGKILLed; {st}", p.label(), p.pid(), TERM_GRACE);
                }
                if panicking {
                    let _ = writeln!(
                        report,
                        "===== log of `{}` (pid {}, {st}) last 60 lines =====\n{}",
                        p.label(),
                        p.pid(),
                        p.log_tail(60)
                    );
                }
            }
        }
        // 2. Delete the namespaces.
        let names = std::mem::take(&mut *self.namespaces.lock().unwrap());
        let mut leftovers = Vec::new();
        for n in names.iter().rev() {
            let out = ip(&["netns", "del", n]);
            if netns_path(n).exists() {
                leftovers.push(format!("{n}: {}", out.describe()));
            }
        }
        // 2b. Per-namespace /etc files we wrote.
        let etc_dirs = std::mem::take(&mut *self.etc_netns.lock().unwrap());
        for d in &etc_dirs {
            if let Err(e) = std::fs::remove_dir_all(d) {
                if e.kind() != io::ErrorKind::NotFound {
                    leftovers.push(format!("{}: {e}", d.display()));
                }
            }
        }
        if !etc_dirs.is_empty() {
            remove_etc_netns_if_ours_and_unused();
        }
        // 3. The temp dir: kept after a failure, for the logs.
        if panicking {
            let _ = writeln!(report, "lab dir kept for inspection: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if !report.is_empty() {
            eprintln!("{report}");
        }
        if !leftovers.is_empty() {
            let msg = format!("lab cleanup could not delete namespaces / netns files: {leftovers:?}");
            if panicking {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// packet capture
// ---------------------------------------------------------------------------

const SOL_PACKET: libc::c_int = 263;
const PACKET_STATISTICS: libc::c_int = 6;
pub const PACKET_OUTGOING: u8 = 4;
const SNAP: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub struct Frame {
    pub ifindex: i32,
    pub pkttype: u8,
    /// Length on the wire (may exceed `data.len()` if truncated).
    pub len: usize,
    pub data: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct CaptureResult {
    pub frames: Vec<Frame>,
    /// Frames the kernel dropped (PACKET_STATISTICS).
    pub kernel_drops: u32,
    /// Frames longer than the capture buffer.
    pub truncated: usize,
    pub error: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct UdpStats {
    pub frames: usize,
    /// Ethernet frame bytes.
    pub bytes: usize,
    /// (src ip:port, dst ip:port) seen.
    pub flows: BTreeSet<(String, String)>,
}

impl CaptureResult {
    pub fn total_bytes(&self) -> usize {
        self.frames.iter().map(|f| f.len).sum()
    }

    /// Number of frames containing `marker`.
    pub fn frames_containing(&self, marker: &[u8]) -> usize {
        self.frames.iter().filter(|f| contains(&f.data, marker)).count()
    }

    /// IPv4/UDP frames between `x` and `y` (either direction).
    pub fn udp_between(&self, x: Ipv4Addr, y: Ipv4Addr) -> UdpStats {
        let mut st = UdpStats::default();
        for f in &self.frames {
            if let Some((src, dst, sport, dport)) = parse_ipv4_udp(&f.data) {
                if (src == x && dst == y) || (src == y && dst == x) {
                    st.frames += 1;
                    st.bytes += f.len;
                    let fmt = |a: Ipv4Addr, p: Option<u16>| match p {
                        Some(p) => format!("{a}:{p}"),
                        None => format!("{a}:(fragment)"),
                    };
                    st.flows.insert((fmt(src, sport), fmt(dst, dport)));
                }
            }
        }
        st
    }
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Ethernet(+802.1Q) / IPv4 / UDP: (src, dst, sport, dport); ports are `None`
/// for non-first fragments.
pub fn parse_ipv4_udp(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, Option<u16>, Option<u16>)> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    off += 2;
    if ethertype == 0x8100 {
        ethertype = u16::from_be_bytes([*frame.get(off + 2)?, *frame.get(off + 3)?]);
        off += 4;
    }
    if ethertype != 0x0800 {
        return None;
    }
    let ip = frame.get(off..)?;
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let frag_off = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if frag_off != 0 || ip.len() < ihl + 4 {
        return Some((src, dst, None, None));
    }
    let sport = u16::from_be_bytes([ip[ihl], ip[ihl + 1]]);
    let dport = u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]]);
    Some((src, dst, Some(sport), Some(dport)))
}

/// AF_PACKET capture running in a background thread inside a namespace.
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<CaptureResult>>,
}

impl Capture {
    /// Starts capturing in `ns_name` on `ifname` (`None`: every interface of
    /// the namespace; then outgoing copies are skipped so a bridged frame is
    /// counted once, at its ingress port). Returns once the socket is bound.
    pub fn start(ns_name: &str, ifname: Option<&str>) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let stop2 = stop.clone();
        let ifname = ifname.map(str::to_string);
        let handle = spawn_in_netns(ns_name, move || {
            capture_loop(ifname.as_deref(), &stop2, ready_tx)
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                panic!("packet capture in {ns_name} failed to start: {e}");
            }
            Err(_) => panic!("packet capture in {ns_name} did not start within 10 s"),
        }
        Capture {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) -> CaptureResult {
        self.stop.store(true, Ordering::SeqCst);
        let h = self.handle.take().expect("capture running");
        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn capture_loop(
    ifname: Option<&str>,
    stop: &AtomicBool,
    ready: mpsc::Sender<Result<(), String>>,
) -> CaptureResult {
    let setup = || -> io::Result<socket2::Socket> {
        let proto = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
        let sock = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(proto)),
        )?;
        let fd = sock.as_raw_fd();
        // As root, force a large buffer so bursts are not dropped.
        let size: libc::c_int = 32 << 20;
        // SAFETY: valid fd, pointer to a c_int of the given size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &size as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let ifindex = match ifname {
            None => 0,
            Some(n) => {
                let c = std::ffi::CString::new(n).unwrap();
                // SAFETY: valid C string.
                let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
                if i == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no interface {n}: {}", io::Error::last_os_error()),
                    ));
                }
                i as i32
            }
        };
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll of the given length.
        let rc = unsafe {
            libc::bind(
                fd,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    };
    let sock = match setup() {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return CaptureResult {
                error: Some(e.to_string()),
                ..Default::default()
            };
        }
    };
    let _ = ready.send(Ok(()));
    let skip_outgoing = ifname.is_none();
    let fd = sock.as_raw_fd();
    let mut res = CaptureResult::default();
    let mut buf = vec![MaybeUninit::<u8>::uninit(); SNAP];
    let mut draining_since: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            // Drain what is queued (briefly), then finish.
            let since = *draining_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(500) {
                break;
            }
        }
        // SAFETY: zeroed sockaddr_ll is valid output storage.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut fromlen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf is SNAP bytes of writable storage; from/fromlen valid.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                SNAP,
                libc::MSG_TRUNC,
                &mut from as *mut _ as *mut libc::sockaddr,
                &mut fromlen,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                    if draining_since.is_some() {
                        break; // queue empty after stop
                    }
                    continue;
                }
                _ => {
                    res.error = Some(e.to_string());
                    break;
                }
            }
        }
        let len = n as usize;
        if skip_outgoing && from.sll_pkttype == PACKET_OUTGOING {
            continue;
        }
        let got = len.min(SNAP);
        if len > SNAP {
            res.truncated += 1;
        }
        // SAFETY: the kernel initialised the first `got` bytes.
        let data = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, got) }.to_vec();
        res.frames.push(Frame {
            ifindex: from.sll_ifindex,
            pkttype: from.sll_pkttype,
            len,
            data,
        });
    }
    // tpacket_stats { tp_packets, tp_drops }
    let mut stats = [0u32; 2];
    let mut sl = std::mem::size_of_val(&stats) as libc::socklen_t;
    // SAFETY: valid fd and output buffer of the given length.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_PACKET,
            PACKET_STATISTICS,
            stats.as_mut_ptr() as *mut libc::c_void,
            &mut sl,
        )
    };
    if rc == 0 {
        res.kernel_drops = stats[1];
    }
    res
}

// ---------------------------------------------------------------------------
// misc
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (splitmix64) with `marker` written at
/// the start of every `stride` bytes.
pub fn marked_random_bytes(len: usize, seed: u64, marker: &[u8], stride: usize) -> Vec<u8> {
    assert!(stride > marker.len());
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&next().to_le_bytes());
    }
    v.truncate(len);
    let mut i = 0;
    while i + marker.len() <= len {
        v[i..i + marker.len()].copy_from_slice(marker);
        i += stride;
    }
    v
}

/// Is `pid` alive (or a zombie)? `kill(pid, 0)` only probes, sends nothing.
pub fn pid_exists(pid: u32) -> bool {
    // SAFETY: signal 0 performs only the existence/permission check.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
