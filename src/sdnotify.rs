//! systemd readiness notification (`sd_notify`), written out because it is one
//! datagram: `READY=1` once the edge serves, and `MAINPID=<pid>` from the process that
//! takes over in a binary upgrade, so systemd follows the new process
//! (`Type=notify`, `NotifyAccess=all`). Without `NOTIFY_SOCKET` nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends `state` to the service manager; false when there is none or it failed.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    sent.is_ok()
}

/// Ready, and (after an upgrade) the new main process.
pub fn ready() -> bool {
    notify(&format!("READY=1\nMAINPID={}", std::process::id()))
}
