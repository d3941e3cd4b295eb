//! Validated conversion from `istio.security.Authorization`.

use xds::istio::security as pb;

use super::{
    Authorization, Clause, IpNet, Match, PolicyAction, PolicyScope, Rule, ServiceAccountMatch,
    StringMatch,
};
use crate::state::{ConversionError, ip_from_bytes, port_from_u32};

fn string_matches(
    field: &'static str,
    list: Vec<pb::StringMatch>,
) -> Result<Vec<StringMatch>, ConversionError> {
    use pb::string_match::MatchType;
    list.into_iter()
        .map(|m| match m.match_type {
            Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s)),
            Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s)),
            Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s)),
            Some(MatchType::Presence(())) => Ok(StringMatch::Presence),
            None => Err(ConversionError::EmptyStringMatch { field }),
        })
        .collect()
}

fn ip_nets(field: &'static str, list: Vec<pb::Address>) -> Result<Vec<IpNet>, ConversionError> {
    list.into_iter()
        .map(|a| {
            let addr = ip_from_bytes(field, &a.address)?;
            // IpNet::new only fails on an over-long prefix.
            IpNet::new(addr, a.length).map_err(|_| ConversionError::PrefixLength {
                field,
                addr,
                len: a.length,
            })
        })
        .collect()
}

fn ports(field: &'static str, list: Vec<u32>) -> Result<Vec<u16>, ConversionError> {
    list.into_iter().map(|p| port_from_u32(field, p)).collect()
}

fn service_accounts(
    field: &'static str,
    list: Vec<pb::ServiceAccountMatch>,
) -> Result<Vec<ServiceAccountMatch>, ConversionError> {
    list.into_iter()
        .map(|m| {
            if m.namespace.is_empty() || m.service_account.is_empty() {
                return Err(ConversionError::Empty { field });
            }
            Ok(ServiceAccountMatch {
                namespace: m.namespace,
                service_account: m.service_account,
            })
        })
        .collect()
}

impl TryFrom<pb::Match> for Match {
    type Error = ConversionError;

    fn try_from(m: pb::Match) -> Result<Self, Self::Error> {
        Ok(Match {
            namespaces: string_matches("namespaces", m.namespaces)?,
            not_namespaces: string_matches("not_namespaces", m.not_namespaces)?,
            principals: string_matches("principals", m.principals)?,
            not_principals: string_matches("not_principals", m.not_principals)?,
            source_ips: ip_nets("source_ips", m.source_ips)?,
            not_source_ips: ip_nets("not_source_ips", m.not_source_ips)?,
            destination_ips: ip_nets("destination_ips", m.destination_ips)?,
            not_destination_ips: ip_nets("not_destination_ips", m.not_destination_ips)?,
            destination_ports: ports("destination_ports", m.destination_ports)?,
            not_destination_ports: ports("not_destination_ports", m.not_destination_ports)?,
            service_accounts: service_accounts("service_accounts", m.service_accounts)?,
            not_service_accounts: service_accounts("not_service_accounts", m.not_service_accounts)?,
        })
    }
}

impl TryFrom<pb::Authorization> for Authorization {
    type Error = ConversionError;

    fn try_from(a: pb::Authorization) -> Result<Self, Self::Error> {
        if a.name.is_empty() {
            return Err(ConversionError::Empty {
                field: "policy name",
            });
        }
        if a.namespace.is_empty() {
            return Err(ConversionError::Empty {
                field: "policy namespace",
            });
        }
        let scope = match pb::Scope::try_from(a.scope) {
            Ok(pb::Scope::Global) => PolicyScope::Global,
            Ok(pb::Scope::Namespace) => PolicyScope::Namespace,
            Ok(pb::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
            Err(_) => {
                return Err(ConversionError::UnknownEnum {
                    field: "scope",
                    value: a.scope,
                });
            }
        };
        let action = match pb::Action::try_from(a.action) {
            Ok(pb::Action::Allow) => PolicyAction::Allow,
            Ok(pb::Action::Deny) => PolicyAction::Deny,
            Err(_) => {
                return Err(ConversionError::UnknownEnum {
                    field: "action",
                    value: a.action,
                });
            }
        };
        let rules = a
            .rules
            .into_iter()
            .map(|r| {
                let clauses = r
                    .clauses
                    .into_iter()
                    .map(|c| {
                        let matches = c
                            .matches
                            .into_iter()
                            .map(Match::try_from)
                            .collect::<Result<Vec<_>, _>>()?;
                        Ok(Clause { matches })
                    })
                    .collect::<Result<Vec<_>, ConversionError>>()?;
                Ok(Rule { clauses })
            })
            .collect::<Result<Vec<_>, ConversionError>>()?;
        Ok(Authorization {
            name: a.name,
            namespace: a.namespace,
            scope,
            action,
            rules,
            dry_run: a.dry_run,
        })
    }
}
