//! `TCP_NODELAY` on the sockets to the state database.
//!
//! sqlx 0.9.0 stopped setting `TCP_NODELAY` on its TCP sockets (upstream
//! issue transact-rs/sqlx#4335, fixed by #4336 but not in a release yet).
//! Without it, Nagle's algorithm holds back the tail of every multi-row
//! statement until PostgreSQL's delayed ACK fires: about 40 ms per batched
//! write. Profiled with `log_min_duration_statement = 0`, a 100 000 link-man
//! first sync spent ~21 s of its 26 s in those gaps between a `BEGIN` and
//! the `Bind` of the next statement.
//!
//! sqlx gives no access to its socket, so after each new connection this
//! sets the option on every TCP socket of the process whose peer port is the
//! database's. Other sockets are left alone. It is idempotent, and a socket
//! that closes meanwhile only makes `setsockopt` fail, which is ignored.
//! Remove it when sqlx ships the fix.

/// Sets `TCP_NODELAY` on every TCP socket of this process connected to
/// `port`; returns how many sockets it set. Linux only (it reads
/// `/proc/self/fd`); elsewhere it does nothing.
pub fn set_on_sockets_to(port: u16) -> usize {
    #[cfg(target_os = "linux")]
    {
        sockets_to(port)
            .into_iter()
            .filter(|&fd| set_nodelay(fd))
            .count()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = port;
        0
    }
}

/// This process's sockets connected to `port`.
#[cfg(target_os = "linux")]
pub(crate) fn sockets_to(port: u16) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&fd| peer_port(fd) == Some(port))
        .collect()
}

/// The peer port of `fd` when it is a connected IPv4 or IPv6 socket.
#[cfg(target_os = "linux")]
fn peer_port(fd: i32) -> Option<u16> {
    // SAFETY: a zeroed sockaddr_storage is valid; getpeername writes at
    // most `len` bytes into it and fails cleanly on a non-socket fd.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let rc = unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4: &libc::sockaddr_in = unsafe { &*(&raw const addr).cast() };
            Some(u16::from_be(v4.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6: &libc::sockaddr_in6 = unsafe { &*(&raw const addr).cast() };
            Some(u16::from_be(v6.sin6_port))
        }
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn set_nodelay(fd: i32) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: the option value points to a live c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// Whether `TCP_NODELAY` is set on `fd` (for tests).
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn has_nodelay(fd: i32) -> bool {
    let mut on: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the out-pointers are to live locals of the given size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw mut on).cast(),
            &mut len,
        )
    };
    rc == 0 && on != 0
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn sets_nodelay_on_sockets_to_the_port_and_leaves_others_alone() {
        // Arrange: two listeners, a client socket to each, Nagle on.
        let db = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to_db = std::net::TcpStream::connect(db.local_addr().unwrap()).unwrap();
        let to_other = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        assert!(!has_nodelay(to_db.as_raw_fd()));

        // Act
        let set = set_on_sockets_to(db.local_addr().unwrap().port());

        // Assert
        assert!(set >= 1);
        assert!(has_nodelay(to_db.as_raw_fd()));
        assert!(!has_nodelay(to_other.as_raw_fd()));
    }
}
