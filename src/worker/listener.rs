//! `SO_REUSEPORT` listeners: one per loop on the same address, so the kernel spreads new connections over
//! the loops without a shared accept queue or lock.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Listen backlog; the kernel caps it at `net.core.somaxconn` (see `tuning/`).
pub const BACKLOG: i32 = 65_535;

/// Binds `n` listeners to `addr`. With port 0 the first listener picks the port and the rest join it.
pub fn bind_all(addr: SocketAddr, n: usize) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let l = bind_one(addr)?;
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_share_one_port() {
        let ls = bind_all("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = ls[0].local_addr().unwrap().port();
        assert!(port != 0);
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
    }
}
