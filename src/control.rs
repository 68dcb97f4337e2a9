//! The local control socket: one JSON request per connection, one JSON
//! answer (`{"status":"ok","data":...}` or an error envelope).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::cli_error::CliError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Down,
    /// Find nodes: `kind` is hostname, capability or group.
    Query { kind: QueryKind, name: String },
    /// A mesh ping to a mesh address, IPv6 address or hostname.
    Ping { target: String },
    /// Rotate the WireGuard key now.
    RotateKeys,
    /// Change what this node declares (missing fields stay as they are).
    Set { hostname: Option<String>, capabilities: Option<Vec<String>>, groups: Option<Vec<String>> },
    /// Stream events: the connection stays open and gets one JSON object
    /// per line (see [`serve_with_events`]).
    Events,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QueryKind {
    Hostname,
    Capability,
    Group,
}

/// A request waiting for the main loop's answer.
pub struct Pending {
    pub request: Request,
    pub reply: oneshot::Sender<serde_json::Value>,
    /// Fires once the answer has been written to the client, so a daemon
    /// that is exiting can wait for its last answer to leave.
    pub written: oneshot::Receiver<()>,
}

impl Pending {
    /// Answers and waits (briefly) until the answer is on its way.
    pub async fn answer_and_flush(self, answer: serde_json::Value) {
        let _ = self.reply.send(answer);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.written).await;
    }
}

/// Binds the control socket (mode 0600), refusing if a live daemon holds it.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::new("io_error", format!("cannot create {}: {e}", dir.display()))
                .hint("run as root, or pass --socket with a path you can write"))?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(CliError::new("already_running", format!("a daemon is already listening on {}", path.display()))
                .hint("stop it with `meshtun down`, or give this one its own --socket")
                .into());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = bind_private(path).map_err(|e| CliError::new("io_error", format!("cannot listen on {}: {e}", path.display())))?;
    Ok(listener)
}

/// Binds inside a fresh 0700 directory next to `path`, sets the socket to
/// 0600 there and only then renames it into place, so no other user can
/// ever connect in the window between bind and chmod (a umask would do the
/// same but is process-wide, and the runtime's other threads create files).
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let private = dir.join(format!(".{}.{}.bind", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("s");
    let result = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Where `{"cmd":"events"}` subscribers get their events from.
#[derive(Clone)]
pub struct EventSource {
    pub events: broadcast::Sender<Arc<str>>,
    /// This node's mesh address, for the first line of the stream.
    pub node: String,
}

/// Accepts connections and forwards each request to the main loop.
pub async fn serve(listener: UnixListener, to_main: mpsc::Sender<Pending>) {
    serve_with_events(listener, to_main, None).await
}

/// Like [`serve`], and answers `{"cmd":"events"}` itself by streaming
/// NDJSON from `source` until the client goes away.
pub async fn serve_with_events(listener: UnixListener, to_main: mpsc::Sender<Pending>, source: Option<EventSource>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let to_main = to_main.clone();
        let source = source.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let answer = match BufReader::new(read).read_line(&mut line).await {
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(Request::Events) => match source {
                        Some(source) => return stream_events(source, write).await,
                        None => error_envelope("unsupported", "this daemon has no event stream", Some("`meshtun events` talks to a node (`meshtun up`)")),
                    },
                    Ok(request) => {
                        let (reply, rx) = oneshot::channel();
                        let (written_tx, written) = oneshot::channel();
                        if to_main.send(Pending { request, reply, written }).await.is_err() {
                            return;
                        }
                        let answer = rx.await.unwrap_or_else(|_| error_envelope("shutting_down", "the daemon is stopping", None));
                        let mut text = answer.to_string();
                        text.push('\n');
                        let _ = write.write_all(text.as_bytes()).await;
                        let _ = write.flush().await;
                        let _ = written_tx.send(());
                        return;
                    }
                    Err(e) => error_envelope("bad_request", &format!("cannot parse request: {e}"), None),
                },
                Err(_) => return,
            };
            let mut text = answer.to_string();
            text.push('\n');
            let _ = write.write_all(text.as_bytes()).await;
        });
    }
}

async fn stream_events(source: EventSource, mut write: tokio::net::unix::OwnedWriteHalf) {
    let mut rx = source.events.subscribe();
    let mut first = crate::events::subscribed(&source.node).to_string();
    first.push('\n');
    if write.write_all(first.as_bytes()).await.is_err() {
        return;
    }
    loop {
        let line: String = match rx.recv().await {
            Ok(line) => line.to_string(),
            Err(broadcast::error::RecvError::Lagged(missed)) => crate::events::lagged(missed).to_string(),
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if write.write_all(line.as_bytes()).await.is_err() || write.write_all(b"\n").await.is_err() {
            return;
        }
    }
}

/// Connects to a daemon's control socket, explaining why not.
async fn connect(path: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(path).await.map_err(|e| {
        let (code, hint) = match e.kind() {
            std::io::ErrorKind::PermissionDenied => ("permission_denied", "run as root (sudo), the socket is mode 0600"),
            _ => ("daemon_not_running", "start one with `meshtun up`, or point --socket at the right path"),
        };
        CliError::new(code, format!("cannot reach the daemon at {}: {e}", path.display())).hint(hint).into()
    })
}

/// Sends `request` and hands every line of the answer stream to `on_line`
/// until the daemon closes it (`Ok`) or answers with an error envelope.
pub async fn stream(path: &Path, request: &Request, mut on_line: impl FnMut(serde_json::Value)) -> anyhow::Result<()> {
    let stream = connect(path).await?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| CliError::new("bad_response", format!("unreadable line from the daemon: {e}")))?;
        if value["status"] == "error" {
            return Err(CliError {
                code: "daemon_error",
                message: value["message"].as_str().unwrap_or("unknown error").to_string(),
                hint: value["hint"].as_str().map(str::to_string),
            }
            .into());
        }
        on_line(value);
    }
    Ok(())
}

pub fn ok_envelope(data: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "status": "ok", "data": data })
}

pub fn error_envelope(code: &str, message: &str, hint: Option<&str>) -> serde_json::Value {
    serde_json::json!({ "status": "error", "code": code, "message": message, "hint": hint })
}

/// Sends one request to a daemon and returns its `data`.
pub async fn call(path: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) => {
            let (code, hint) = match e.kind() {
                std::io::ErrorKind::PermissionDenied => ("permission_denied", "run as root (sudo), the socket is mode 0600"),
                _ => ("daemon_not_running", "start one with `meshtun up` (or `meshtun backbone`), or point --socket at the right path"),
            };
            return Err(CliError::new(code, format!("cannot reach the daemon at {}: {e}", path.display())).hint(hint).into());
        }
    };
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), BufReader::new(read).read_line(&mut line))
        .await
        .map_err(|_| CliError::new("timeout", "the daemon did not answer within 10 s"))??;
    let answer: serde_json::Value = serde_json::from_str(&line)
        .map_err(|e| CliError::new("bad_response", format!("unreadable answer from the daemon: {e}")))?;
    if answer["status"] == "ok" {
        Ok(answer["data"].clone())
    } else {
        Err(CliError {
            code: "daemon_error",
            message: answer["message"].as_str().unwrap_or("unknown error").to_string(),
            hint: answer["hint"].as_str().map(str::to_string),
        }
        .into())
    }
}

#[cfg(test)]
mod bind_tests {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    #[tokio::test]
    async fn the_control_socket_is_created_mode_0600_and_leaves_no_staging_directory() {
        let dir = std::env::temp_dir().join(format!("meshtun-control-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("meshtun.sock");
        let listener = super::bind(&path).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket(), "{} is not a socket", path.display());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from("meshtun.sock")], "staging directory left behind");
        let (client, accepted) = tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
        assert!(client.is_ok() && accepted.is_ok(), "the renamed socket does not accept connections");
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
