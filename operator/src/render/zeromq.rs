//! A ZeroMQ consumer's endpoint: the Service clients connect to, and the
//! NetworkPolicy that admits only the selected clients to its port.
//!
//! Both select the injected pods by [`labels::ZEROMQ_ENDPOINT_LABEL`], which
//! only the pods that run this resource's sidecar carry.
//!
//! A NetworkPolicy that selects pods for ingress isolates them: from then on
//! they take only what some policy allows, on every port. Admitting the
//! clients to the ZeroMQ port alone would therefore close the application's
//! other ports (its HTTP API, the sidecar's metrics). With `otherPorts: open`
//! (the default) the policy also admits every source to every other port,
//! so the pods stay as reachable as they were; in a namespace whose policies
//! deny by default, that opens those ports, and `otherPorts: isolate` leaves
//! them to the other policies instead.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{owned_meta, RenderError};
use crate::crd::{BrokerKind, IdempotentConsumer, OtherPorts, ZeroMqBinding};
use crate::labels;

fn binding(ic: &IdempotentConsumer) -> Result<&ZeroMqBinding, RenderError> {
    match ic.spec.broker.kind() {
        Some(BrokerKind::ZeroMq(zmq)) => Ok(zmq),
        _ => Err(RenderError::Broker),
    }
}

/// The labels of the pods that run `ic`'s sidecar and bind its endpoint.
pub fn endpoint_selector(ic: &IdempotentConsumer) -> BTreeMap<String, String> {
    BTreeMap::from([(labels::ZEROMQ_ENDPOINT_LABEL.to_string(), ic.name_any())])
}

/// The Service named after the resource: its port is the sidecars' ZeroMQ
/// port, targeted by name so that only pods declaring it are endpoints.
pub fn service(ic: &IdempotentConsumer) -> Result<Service, RenderError> {
    let zmq = binding(ic)?;
    Ok(Service {
        metadata: owned_meta(ic, labels::zeromq_service(ic), "zeromq")?,
        spec: Some(ServiceSpec {
            selector: Some(endpoint_selector(ic)),
            ports: Some(vec![ServicePort {
                name: Some("zeromq".to_string()),
                protocol: Some("TCP".to_string()),
                port: i32::from(zmq.port()),
                target_port: Some(IntOrString::String(labels::ZEROMQ_PORT_NAME.to_string())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// The NetworkPolicy `networkPolicy` asks for, if it does.
pub fn network_policy(ic: &IdempotentConsumer) -> Result<Option<NetworkPolicy>, RenderError> {
    let zmq = binding(ic)?;
    let Some(asked) = &zmq.network_policy else {
        return Ok(None);
    };
    let port = zmq.port();
    let tcp = |from: u16, to: u16| NetworkPolicyPort {
        protocol: Some("TCP".to_string()),
        port: Some(IntOrString::Int(i32::from(from))),
        end_port: (to > from).then_some(i32::from(to)),
    };
    let mut ingress = vec![NetworkPolicyIngressRule {
        from: Some(vec![NetworkPolicyPeer {
            pod_selector: Some(asked.client_selector.clone()),
            ..NetworkPolicyPeer::default()
        }]),
        ports: Some(vec![tcp(port, port)]),
    }];
    if asked.other_ports.unwrap_or(OtherPorts::Open) == OtherPorts::Open {
        // Every source, every port but the endpoint's: TCP below and above
        // it, and all of UDP.
        let mut ports = Vec::new();
        if port > 1 {
            ports.push(tcp(1, port - 1));
        }
        if port < u16::MAX {
            ports.push(tcp(port + 1, u16::MAX));
        }
        ports.push(NetworkPolicyPort {
            protocol: Some("UDP".to_string()),
            ..NetworkPolicyPort::default()
        });
        ingress.push(NetworkPolicyIngressRule {
            from: None,
            ports: Some(ports),
        });
    }
    Ok(Some(NetworkPolicy {
        metadata: owned_meta(ic, labels::zeromq_service(ic), "zeromq")?,
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(endpoint_selector(ic)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_string()]),
            ingress: Some(ingress),
            egress: None,
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::sample;
    use serde_json::json;

    #[test]
    fn the_service_is_named_after_the_resource_owned_and_targets_the_sidecars_port() {
        let ic = sample::zeromq_policy();
        let s = serde_json::to_value(service(&ic).expect("service")).expect("json");
        assert_eq!(s["metadata"]["name"], "orders");
        assert_eq!(s["metadata"]["ownerReferences"][0]["controller"], true);
        assert_eq!(
            s["spec"]["selector"],
            json!({ "idemq.dev/zeromq-endpoint": "orders" })
        );
        assert_eq!(
            s["spec"]["ports"],
            json!([{ "name": "zeromq", "protocol": "TCP", "port": 5555, "targetPort": "idemq-zmq" }])
        );
    }

    #[test]
    fn the_policy_admits_only_the_clients_to_the_port_and_leaves_other_ports_open_unless_asked() {
        let mut ic = sample::zeromq_policy();
        let p = serde_json::to_value(network_policy(&ic).expect("render").expect("asked"))
            .expect("json");
        assert_eq!(
            p["spec"]["podSelector"],
            json!({ "matchLabels": { "idemq.dev/zeromq-endpoint": "orders" } })
        );
        assert_eq!(p["spec"]["policyTypes"], json!(["Ingress"]));
        let rules = p["spec"]["ingress"].as_array().expect("rules");
        assert_eq!(
            rules[0],
            json!({ "from": [{ "podSelector": { "matchLabels": { "app": "orders-client" } } }],
                    "ports": [{ "protocol": "TCP", "port": 5555 }] })
        );
        assert_eq!(
            rules[1],
            json!({ "ports": [
                { "protocol": "TCP", "port": 1, "endPort": 5554 },
                { "protocol": "TCP", "port": 5556, "endPort": 65535 },
                { "protocol": "UDP" } ] }),
            "every source on every other port"
        );

        let zmq = ic.spec.broker.zeromq.as_mut().expect("zeromq");
        zmq.port = Some(65535);
        let edge = serde_json::to_value(network_policy(&ic).expect("render")).expect("json");
        assert_eq!(
            edge["spec"]["ingress"][1]["ports"][0],
            json!({ "protocol": "TCP", "port": 1, "endPort": 65534 })
        );
        assert_eq!(edge["spec"]["ingress"][1]["ports"][1]["protocol"], "UDP");

        let zmq = ic.spec.broker.zeromq.as_mut().expect("zeromq");
        zmq.network_policy.as_mut().expect("asked").other_ports = Some(OtherPorts::Isolate);
        let isolated = serde_json::to_value(network_policy(&ic).expect("render")).expect("json");
        assert_eq!(
            isolated["spec"]["ingress"].as_array().map(Vec::len),
            Some(1),
            "only the clients' rule"
        );

        ic.spec
            .broker
            .zeromq
            .as_mut()
            .expect("zeromq")
            .network_policy = None;
        assert_eq!(network_policy(&ic), Ok(None));
    }
}
