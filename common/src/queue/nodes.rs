//! `AMQP_URL` as a cluster: one URL per RabbitMQ node, separated by commas, e.g.
//! `amqp://u:p@mq-0:5672/%2f,amqp://u:p@mq-1:5672/%2f,amqp://u:p@mq-2:5672/%2f`.
//!
//! Every connection Ultra opens (the publisher's, each worker's, the tools') goes
//! through [`connect`], which takes the first node that answers. A connection does not
//! move by itself: when it drops, its owner reconnects (the consumer's supervisor, the
//! publisher on its next use) through [`connect`] again, which then finds a node that
//! is still up. Nothing here quotes a URL back, in errors or logs: URLs carry passwords.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex, PoisonError},
};

use lapin::{uri::AMQPUri, Connection, ConnectionProperties};

use super::CONNECT_TIMEOUT;

/// One node of `AMQP_URL`. Deliberately not `Debug`: the URI holds the password.
#[derive(Clone)]
pub struct Node {
    /// Where and how to connect, credentials included.
    pub uri: AMQPUri,
    /// `host:port`: what logs and errors name the node by.
    pub label: String,
}

/// Splits `list` at commas and parses each node's URL (`amqp://` or `amqps://`). The
/// error lists every problem, naming nodes by position.
pub fn parse(list: &str) -> Result<Vec<Node>, Vec<String>> {
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    let several = entries.len() > 1;
    let position = |index: usize| if several { format!("AMQP_URL node {}", index + 1) } else { "AMQP_URL".to_owned() };
    let mut nodes = Vec::with_capacity(entries.len());
    let mut problems = Vec::new();
    for (index, entry) in entries.iter().copied().enumerate() {
        if entry.is_empty() {
            problems.push(format!("{} is empty (a stray comma in the list?)", position(index)));
            continue;
        }
        let scheme = entry.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
        if !matches!(scheme.as_deref(), Some("amqp" | "amqps")) {
            problems.push(format!(
                "{} is not an amqp:// or amqps:// URL (write a comma inside a password as %2C)",
                position(index)
            ));
            continue;
        }
        match entry.parse::<AMQPUri>() {
            Ok(uri) => {
                let label = format!("{}:{}", uri.authority.host, uri.authority.port);
                nodes.push(Node { uri, label });
            }
            // The parser's message may quote the URL; say only which node it is then.
            Err(reason) if reason.contains(entry) => {
                problems.push(format!("{} is not a valid AMQP URL", position(index)))
            }
            Err(reason) => problems.push(format!("{} is not a valid AMQP URL: {reason}", position(index))),
        }
    }
    if problems.is_empty() {
        Ok(nodes)
    } else {
        Err(problems)
    }
}

/// For each list of several nodes, the node that answered last: the next connection
/// starts there, so a dead node early in the list is not tried first every time.
static LAST_ANSWERED: LazyLock<Mutex<HashMap<String, usize>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

fn last_answered(list: &str) -> usize {
    LAST_ANSWERED.lock().unwrap_or_else(PoisonError::into_inner).get(list).copied().unwrap_or(0)
}

fn remember(list: &str, index: usize) {
    LAST_ANSWERED.lock().unwrap_or_else(PoisonError::into_inner).insert(list.to_owned(), index);
}

/// Connects to the first node of `list` (one URL or several, comma-separated) that
/// answers, in list order from the node that answered last; each attempt gives up after
/// `CONNECT_TIMEOUT`. `name` becomes the connection's `connection_name`, which operators
/// and tests find it by.
pub async fn connect(list: &str, name: &str) -> Result<Connection, lapin::Error> {
    let nodes = parse(list).map_err(|problems| {
        lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, problems.join("; ")))
    })?;
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let start = if nodes.len() > 1 { last_answered(list) % nodes.len() } else { 0 };
    let mut failures: Vec<(&Node, lapin::Error)> = Vec::new();
    for offset in 0..nodes.len() {
        let index = (start + offset) % nodes.len();
        let node = &nodes[index];
        let attempt = Connection::connect_uri(node.uri.clone(), properties.clone());
        let error = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(connection)) => {
                if nodes.len() > 1 {
                    remember(list, index);
                }
                if !failures.is_empty() {
                    tracing::info!(node = %node.label, nodes_down = failures.len(), %name, "connected to another RabbitMQ node");
                }
                return Ok(connection);
            }
            Ok(Err(err)) => err,
            Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out connecting to RabbitMQ").into(),
        };
        tracing::debug!(node = %node.label, error = %error, "RabbitMQ node did not answer");
        failures.push((node, error));
    }
    if failures.len() > 1 {
        let each: Vec<String> = failures.iter().map(|(node, error)| format!("{}: {error}", node.label)).collect();
        return Err(std::io::Error::other(format!("no RabbitMQ node answered ({})", each.join("; "))).into());
    }
    // One node: its own error, as before lists existed.
    match failures.pop() {
        Some((_, error)) => Err(error),
        None => Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "AMQP_URL names no node").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_one_node() {
        let nodes = parse("amqp://guest:guest@127.0.0.1:5672/%2f").map_err(|p| p.join("; ")).expect("parses");
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].label, "127.0.0.1:5672");
        assert_eq!(nodes[0].uri.vhost, "/");
    }

    #[test]
    fn a_list_keeps_its_order_and_each_node_its_own_credentials() {
        let list = "amqp://a:pa@mq-0:5701/%2f, amqp://b:pb@mq-1:5702/%2f ,amqps://c:p%2Cc@mq-2/v";
        let nodes = parse(list).map_err(|p| p.join("; ")).expect("parses");
        let labels: Vec<&str> = nodes.iter().map(|n| n.label.as_str()).collect();
        assert_eq!(labels, ["mq-0:5701", "mq-1:5702", "mq-2:5671"]);
        assert_eq!(nodes[1].uri.authority.userinfo.username, "b");
        // A comma inside a password is written %2C, and decoded.
        assert_eq!(nodes[2].uri.authority.userinfo.password, "p,c");
        assert_eq!(nodes[2].uri.vhost, "v");
    }

    #[test]
    fn every_problem_is_listed_by_position_without_the_url() {
        let list = "amqp://u:secret@mq-0:5672/%2f,,http://u:secret@mq-2/,amqp://u:secret@mq-3:notaport/";
        let problems = parse(list).err().expect("refused");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("AMQP_URL node 2 is empty"), "{problems:?}");
        assert!(problems[1].starts_with("AMQP_URL node 3 is not an amqp://"), "{problems:?}");
        assert!(problems[2].starts_with("AMQP_URL node 4 is not a valid AMQP URL"), "{problems:?}");
        assert!(problems.iter().all(|p| !p.contains("secret")), "{problems:?}");
    }

    #[test]
    fn an_empty_setting_is_refused() {
        assert_eq!(parse("").err().map(|p| p.len()), Some(1));
        assert_eq!(parse(" , ").err().map(|p| p.len()), Some(2));
    }

    #[test]
    fn a_password_with_an_unencoded_comma_is_caught() {
        // The tail after the comma is no URL: refused, rather than half a password used.
        let problems = parse("amqp://u:pa,ss@mq:5672/%2f").err().expect("refused");
        assert!(problems.iter().any(|p| p.contains("%2C")), "{problems:?}");
        assert!(problems.iter().all(|p| !p.contains("pa,ss") && !p.contains("ss@mq")), "{problems:?}");
    }

    #[tokio::test]
    async fn connecting_names_every_node_that_failed_and_no_password() {
        // Port 1 on loopback refuses at once.
        let list = "amqp://u:secret@127.0.0.1:1/%2f,amqp://u:secret@127.0.0.1:1/%2f";
        let err = connect(list, "test").await.expect_err("nothing listens on port 1");
        let message = err.to_string();
        assert!(message.contains("no RabbitMQ node answered"), "{message}");
        assert!(message.matches("127.0.0.1:1").count() >= 2, "{message}");
        assert!(!message.contains("secret"), "{message}");
    }
}
