//! Who this process is, for the lease row, the logs and the `User-Agent`
//! of every request (`crm-edm-sync/VERSION (instance ID)`), so that the
//! remote services' logs — and the sandbox's request log in tests — tell
//! two instances apart. A leaf: imports nothing of the crate.

use std::sync::Arc;

/// This process: its configured or derived id, host name and pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// `daemon.instance_id`, or `HOST-PID` when that is empty.
    pub id: String,
    pub host: String,
    pub pid: u32,
}

impl Instance {
    /// This process, named `configured` (or `HOST-PID` when it is empty).
    pub fn current(configured: &str) -> Arc<Instance> {
        let host = host_name();
        let pid = std::process::id();
        let id = match configured.trim() {
            "" => format!("{host}-{pid}"),
            id => id.to_string(),
        };
        Arc::new(Instance { id, host, pid })
    }

    /// The `User-Agent` of every request this instance makes.
    pub fn user_agent(&self) -> String {
        format!("{} ({})", default_user_agent(), self.id)
    }
}

/// The `User-Agent` of a client built without an instance.
pub(crate) fn default_user_agent() -> &'static str {
    concat!("crm-edm-sync/", env!("CARGO_PKG_VERSION"))
}

/// The machine's host name (`localhost` when it cannot be read).
pub(crate) fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match String::from_utf8_lossy(&buf[..end]).trim() {
        "" => "localhost".to_string(),
        name => name.to_string(),
    }
}

/// Whether a process with `pid` runs on this machine (signal 0: existence
/// check; a process of another user still counts as alive).
pub(crate) fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 sends nothing; it only checks the pid.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_configured_id_becomes_host_and_pid() {
        let me = Instance::current("  ");
        assert_eq!(me.id, format!("{}-{}", host_name(), std::process::id()));
        assert!(me.user_agent().starts_with("crm-edm-sync/"));
        assert!(me.user_agent().ends_with(&format!("({})", me.id)));
    }

    #[test]
    fn a_configured_id_is_used_as_given() {
        assert_eq!(Instance::current("blue").id, "blue");
    }

    #[test]
    fn this_process_is_alive_and_an_unused_pid_is_not() {
        assert!(process_alive(std::process::id()));
        // Above the kernel's pid_max (at most 2^22).
        assert!(!process_alive(4_194_305));
    }
}
