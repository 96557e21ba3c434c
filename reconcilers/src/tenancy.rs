//! Where the operator writes on its users' behalf, and how much: the limits that hold even when
//! the chart's admission policies are switched off (SPEC §9).

use std::collections::BTreeSet;

use crate::error::{Error, Result};

/// Namespaces that never receive a ConfigMap from this operator, whatever a resource asks: the
/// control plane's own. The operator's own namespace is added at start.
pub const DEFAULT_PROTECTED_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];

/// ConfigMap names that other components publish in many namespaces (cluster CA bundles, DNS,
/// cloud identity mappings): a copy under one of them would shadow or pre-empt theirs.
pub const DEFAULT_RESERVED_CONFIG_MAP_NAMES: [&str; 7] = [
    "kube-root-ca.crt",
    "openshift-service-ca.crt",
    "istio-ca-root-cert",
    "extension-apiserver-authentication",
    "cluster-info",
    "coredns",
    "aws-auth",
];

/// Default of [`Tenancy::broadcast_max_bytes`]: 16 MiB, e.g. a 64 KiB message to 256 namespaces.
pub const DEFAULT_BROADCAST_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// The limits on what resources may make the operator write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenancy {
    /// Namespaces the operator never writes a ConfigMap into; a MessageBroadcast skips them and
    /// removes the copies it had there, a MyResource in one is Failed.
    pub protected_namespaces: BTreeSet<String>,
    /// ConfigMap names the operator never writes.
    pub reserved_config_map_names: BTreeSet<String>,
    /// The most bytes one MessageBroadcast may write in total, in bytes: its message's UTF-8
    /// length times the namespaces it matches. Past it the broadcast is Failed and writes nothing
    /// (copies it already has stay as they are).
    pub broadcast_max_bytes: u64,
}

impl Default for Tenancy {
    fn default() -> Self {
        Self {
            protected_namespaces: DEFAULT_PROTECTED_NAMESPACES.iter().map(|&name| name.to_owned()).collect(),
            reserved_config_map_names: DEFAULT_RESERVED_CONFIG_MAP_NAMES.iter().map(|&name| name.to_owned()).collect(),
            broadcast_max_bytes: DEFAULT_BROADCAST_MAX_BYTES,
        }
    }
}

impl Tenancy {
    /// True when the operator must not write into `namespace`.
    pub fn is_protected(&self, namespace: &str) -> bool {
        self.protected_namespaces.contains(namespace)
    }

    /// [`Error::ProtectedNamespace`] when the operator must not write into `namespace`.
    pub fn check_namespace(&self, namespace: &str) -> Result<()> {
        if self.is_protected(namespace) {
            return Err(Error::ProtectedNamespace { namespace: namespace.to_owned() });
        }
        Ok(())
    }

    /// [`Error::ReservedConfigMapName`] when `name` is reserved.
    pub fn check_name(&self, name: &str) -> Result<()> {
        if self.reserved_config_map_names.contains(name) {
            return Err(Error::ReservedConfigMapName { name: name.to_owned() });
        }
        Ok(())
    }

    /// [`Error::BroadcastTooLarge`] when `message_bytes` copied into `namespaces` namespaces
    /// would pass [`Self::broadcast_max_bytes`].
    pub fn check_broadcast_size(&self, message_bytes: usize, namespaces: usize) -> Result<()> {
        let bytes = (message_bytes as u64).saturating_mul(namespaces as u64);
        if bytes > self.broadcast_max_bytes {
            return Err(Error::BroadcastTooLarge { bytes, namespaces, limit: self.broadcast_max_bytes });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_protect_the_control_plane_and_reserve_shared_names() {
        let tenancy = Tenancy::default();
        assert!(tenancy.check_namespace("kube-system").is_err());
        assert!(tenancy.check_namespace("team-a").is_ok());
        assert!(tenancy.check_name("kube-root-ca.crt").is_err());
        assert!(tenancy.check_name("coredns").is_err());
        assert!(tenancy.check_name("coredns-custom").is_ok());
    }

    #[test]
    fn the_size_cap_counts_message_bytes_times_namespaces() {
        let tenancy = Tenancy { broadcast_max_bytes: 1000, ..Tenancy::default() };
        assert!(tenancy.check_broadcast_size(100, 10).is_ok(), "exactly the cap is allowed");
        let error = tenancy.check_broadcast_size(100, 11).err();
        assert!(
            matches!(error, Some(Error::BroadcastTooLarge { bytes: 1100, namespaces: 11, limit: 1000 })),
            "{error:?}"
        );
        assert!(tenancy.check_broadcast_size(usize::MAX, usize::MAX).is_err(), "no overflow");
    }
}
