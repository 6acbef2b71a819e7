//! What a QMP peer supports, detected from the peer itself (`query-qmp-schema`, migration capabilities and
//! parameters) rather than assumed from its version.

use std::collections::BTreeSet;

use super::types::{QueryMigrateCapabilities, QueryMigrateParameters, QueryQmpSchema};
use super::{Qmp, QmpError};

#[derive(Debug, Clone, Default)]
pub struct PeerFeatures {
    pub version: (u32, u32, u32),
    pub commands: BTreeSet<String>,
    pub events: BTreeSet<String>,
    pub migration_capabilities: BTreeSet<String>,
    pub migration_parameters: BTreeSet<String>,
}

impl PeerFeatures {
    pub async fn detect(qmp: &Qmp) -> Result<PeerFeatures, QmpError> {
        let schema = qmp.execute(&QueryQmpSchema {}).await?;
        let caps = qmp.execute(&QueryMigrateCapabilities {}).await?;
        let params = qmp.execute(&QueryMigrateParameters {}).await?;
        let of_type = |t: &str| {
            schema
                .iter()
                .filter(|e| e.meta_type == t)
                .map(|e| e.name.clone())
                .collect::<BTreeSet<_>>()
        };
        Ok(PeerFeatures {
            version: qmp.greeting().version,
            commands: of_type("command"),
            events: of_type("event"),
            migration_capabilities: caps.into_iter().map(|c| c.capability).collect(),
            migration_parameters: params.keys().cloned().collect(),
        })
    }

    pub fn has_command(&self, name: &str) -> bool {
        self.commands.contains(name)
    }

    pub fn has_capability(&self, name: &str) -> bool {
        self.migration_capabilities.contains(name)
    }

    pub fn has_parameter(&self, name: &str) -> bool {
        self.migration_parameters.contains(name)
    }
}
