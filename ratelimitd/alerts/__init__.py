"""Alerts: the record, where Redis keeps it, signed webhook delivery, the usage API's reader.

Where an alert goes, and why (exactly once per subject, limit and period; pending alerts
survive a daemon restart; cluster-safe):

1. **Decided and recorded in the quota script.** The settle Lua (cost thresholds) and the
   reserve Lua (anomalies) decide an alert in the same call that records the spend, and push
   it to the subject's own capped list `rl:{<tag>}:alerts` (streams.py; a list because it is
   ten times smaller than a stream for the few alerts a subject has). A script may touch only
   its subject's hash slot, so this key carries the subject's hash tag; a deployment-wide
   stream cannot be written from there in cluster mode. The push is atomic with the decision:
   the alert exists exactly once, and the usage API reads it back (`recent_alerts`).
2. **Returned to the daemon.** The script also returns the alerts it pushed (each the JSON
   array of its field/value strings: `decode_alert_json`), and the settled reservation record
   keeps them, so a repeated commit answers the same alerts. The commit answer shows them
   (`Alert.to_json`).
3. **Forwarded to the outbox.** The daemon hands them to `AlertService.submit`, which returns at
   once; a background task appends each to the one outbox stream `rl:{alerts}:outbox`
   (a slot of its own), idempotently by alert id, so a repeated commit's alerts or a retried
   append do not make a second entry.
4. **Delivered from the outbox.** Per webhook URL one consumer group: every daemon reads it,
   POSTs each entry signed, and acknowledges it after a 2xx; entries a dead daemon left
   unacknowledged are claimed by another (delivery.py, webhook.py). The outbox is what
   survives a restart.

The window this leaves: an alert is durable in the outbox once appended (milliseconds after the
commit, or until Redis is back). A daemon that dies between the script's reply and that append
(or sheds it from a full queue) loses its webhook delivery unless the gateway repeats the commit
(the repeat's answer forwards it again); the alert itself stays in its subject's list and the
usage API. Closing that window entirely would need a sweep of every subject's list (SCAN over
the cluster), or the script writing the outbox itself (one slot only outside cluster mode):
not done, by choice: rare (a crash in a millisecond window), and costly to close.

Receivers get each alert once per webhook in the normal case and at least once across crashes:
they dedupe on the alert's `id` (deterministic, quota/alert_record.py). They verify the
signature with `verify_webhook_signature` (signing.py).
"""

from ratelimitd.alerts.delivery import AlertService
from ratelimitd.alerts.settings import AlertStats
from ratelimitd.alerts.signing import (
    SIGNATURE_HEADER,
    signature_header,
    verify_webhook_signature,
)
from ratelimitd.alerts.streams import (
    OUTBOX_KEY,
    Outbox,
    append_alert,
    recent_alerts,
    subject_alerts_key,
)
from ratelimitd.alerts.webhook import webhook_group
from ratelimitd.quota.alert_record import (
    Alert,
    AlertDecodeError,
    alert_id,
    decode_alert,
    decode_alert_json,
    severity_for,
)

__all__ = [
    "OUTBOX_KEY",
    "SIGNATURE_HEADER",
    "Alert",
    "AlertDecodeError",
    "AlertService",
    "AlertStats",
    "Outbox",
    "alert_id",
    "append_alert",
    "decode_alert",
    "decode_alert_json",
    "recent_alerts",
    "severity_for",
    "signature_header",
    "subject_alerts_key",
    "verify_webhook_signature",
    "webhook_group",
]
