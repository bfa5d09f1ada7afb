//! Leader election with a `coordination.k8s.io/v1` Lease, so that of several
//! replicas only one reconciles.
//!
//! The holder renews the lease every `renew` period; another replica takes it
//! over once `duration` has passed without a renewal. Every write carries the
//! lease's resourceVersion, so two replicas racing for it cannot both win.
//! A replica that loses the lease stops (and is restarted as a candidate),
//! which is simpler and safer than trying to cancel reconciles in flight.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};

pub struct Elector {
    pub api: Api<Lease>,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl Elector {
    /// Tries once to acquire or renew; true when this replica holds the lease.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: acquired.or(Some(now.clone())),
            renew_time: Some(now.clone()),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status))
                    if status.is_conflict() || status.is_already_exists() =>
                {
                    Ok(false)
                }
                Err(e) => Err(e),
            };
        };
        let current = lease.spec.clone().unwrap_or_default();
        let mine = current.holder_identity.as_deref() == Some(self.identity.as_str());
        let expired = current.renew_time.as_ref().is_none_or(|renewed| {
            let ttl =
                SignedDuration::from_secs(i64::from(current.lease_duration_seconds.unwrap_or(15)));
            renewed.0.checked_add(ttl).is_ok_and(|until| until < now.0)
        });
        if !mine && !expired {
            return Ok(false);
        }
        let transitions = current.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { current.acquire_time } else { None };
        lease.spec = Some(spec(transitions, acquired));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}
