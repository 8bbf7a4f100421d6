//! The instance template: a command with placeholders, an address and port ranges.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use model::units::PortRange;

/// What every instance of a set is started from; a change rolls through as an upgrade.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub command: Vec<String>,
    pub bind: IpAddr,
    pub ports: BTreeMap<String, PortRange>,
}

impl Template {
    pub fn of(set: &model::ScaleSet) -> Self {
        Template {
            command: set.command.clone(),
            bind: set.bind,
            ports: set.ports.clone(),
        }
    }

    /// The ports of the instance in `slot`: the slot-th port of every range.
    pub fn ports(&self, slot: u32) -> BTreeMap<String, u16> {
        self.ports
            .iter()
            .map(|(name, r)| (name.clone(), (u32::from(r.first) + slot) as u16))
            .collect()
    }

    /// Where the instance in `slot` listens on the port named `port` (port 0 if no such name).
    pub fn address(&self, slot: u32, port: &str) -> SocketAddr {
        let first = self.ports.get(port).map_or(0, |r| u32::from(r.first));
        let port = if first == 0 { 0 } else { (first + slot) as u16 };
        SocketAddr::new(self.bind, port)
    }

    /// The command with `{site}`, `{instance}`, `{address}` and `{port.NAME}` filled in.
    pub fn argv(&self, site: &str, instance: &str, slot: u32) -> Vec<String> {
        let ports = self.ports(slot);
        self.command
            .iter()
            .map(|arg| {
                let mut a = arg
                    .replace("{site}", site)
                    .replace("{instance}", instance)
                    .replace("{address}", &self.bind.to_string());
                for (name, port) in &ports {
                    a = a.replace(&format!("{{port.{name}}}"), &port.to_string());
                }
                a
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn placeholders_are_filled_per_slot() {
        let t = Template {
            command: vec![
                "app".into(),
                "--listen={address}:{port.http}".into(),
                "--admin".into(),
                "{port.admin}".into(),
                "{site}/{instance}".into(),
                "{port.nope}".into(),
            ],
            bind: "127.0.1.1".parse().unwrap(),
            ports: [
                ("http".to_string(), PortRange::parse("20000-20099").unwrap()),
                (
                    "admin".to_string(),
                    PortRange::parse("21000-21099").unwrap(),
                ),
            ]
            .into(),
        };
        assert_eq!(
            t.argv("edge", "web-3", 3),
            [
                "app",
                "--listen=127.0.1.1:20003",
                "--admin",
                "21003",
                "edge/web-3",
                "{port.nope}"
            ]
        );
    }
}
