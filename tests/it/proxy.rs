//! A TCP proxy a test can cut: the way to take a real service "down" for one test
//! without touching the shared server other tests are using.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

pub struct Proxy {
    pub address: SocketAddr,
    up: Arc<AtomicBool>,
    /// Bumped on every cut, so open connections close.
    cuts: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Forwards connections on a free local port to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let up = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0);
        let task = tokio::spawn(accept(listener, target, up.clone(), cuts.clone()));
        Self { address, up, cuts, task }
    }

    /// A proxy to the server a URL names, and the same URL pointing at the proxy.
    pub async fn start_for_url(url: &str) -> (Self, String) {
        let (scheme, rest) = url.split_once("://").expect("URL with a scheme");
        let (userinfo, rest) = rest.rsplit_once('@').map_or(("", rest), |(u, r)| (u, r));
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let target = tokio::net::lookup_host(authority).await.expect("resolve").next().expect("an address");
        let proxy = Self::start(target).await;
        let at = if userinfo.is_empty() { String::new() } else { format!("{userinfo}@") };
        let url = format!("{scheme}://{at}{}{path}", proxy.address);
        (proxy, url)
    }

    /// Closes every open connection and refuses new ones, like a dead server.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, up: Arc<AtomicBool>, cuts: watch::Sender<u64>) {
    while let Ok((mut client, _)) = listener.accept().await {
        if !up.load(Ordering::SeqCst) {
            continue; // dropping the socket closes it: connection refused in effect
        }
        let mut cut = cuts.subscribe();
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else { return };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = cut.changed() => {}
            }
        });
    }
}
