//! A TCP forwarder on a loopback port, for making a backend disappear and come back: `stop`
//! closes the listener and every forwarded connection (new connections are then refused),
//! `resume` listens on the same port again.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Forwarder {
    pub port: u16,
    target: SocketAddr,
    running: Mutex<Option<Running>>,
}

struct Running {
    stop: Arc<AtomicBool>,
    accept: JoinHandle<()>,
    /// Both ends of every forwarded connection.
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Forwarder {
    /// Forwards 127.0.0.1:<free port> to `target`.
    pub fn start(target: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let f = Forwarder {
            port,
            target,
            running: Mutex::new(None),
        };
        f.run(listener);
        f
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn run(&self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let target = self.target;
        let accept = {
            let stop = stop.clone();
            let conns = conns.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => forward(client, target, &conns),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(e) => panic!("forwarder accept: {e}"),
                    }
                }
                // The listener is dropped here: connections are refused from now on.
            })
        };
        *self.running.lock().unwrap() = Some(Running {
            stop,
            accept,
            conns,
        });
    }

    /// Closes the listener and all forwarded connections; returns once connecting is refused.
    pub fn stop(&self) {
        let Some(r) = self.running.lock().unwrap().take() else {
            return;
        };
        r.stop.store(true, Ordering::SeqCst);
        r.accept.join().unwrap();
        for c in r.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Listens on the same port again.
    pub fn resume(&self) {
        assert!(
            self.running.lock().unwrap().is_none(),
            "forwarder is running"
        );
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        self.run(listener);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

fn forward(client: TcpStream, target: SocketAddr, conns: &Mutex<Vec<TcpStream>>) {
    client.set_nonblocking(false).unwrap();
    let Ok(upstream) = TcpStream::connect(target) else {
        return; // dropping the client closes it
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    {
        let mut list = conns.lock().unwrap();
        list.push(client.try_clone().unwrap());
        list.push(upstream.try_clone().unwrap());
    }
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        })
    };
    pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
    pipe(upstream, client);
}
