#!/usr/bin/env bash
# Deploy the DICOM→BigQuery export service to Google Cloud. Idempotent: run it again to update.
#
#   ./deploy.sh --project my-proj --region us-central1 \
#       --allowed-stores 'projects/my-proj/locations/us-central1/datasets/*/dicomStores/*' \
#       --allowed-datasets 'my-proj.imaging' --dest-projects my-proj [--dry-run]
#
# Every setting is a flag or an environment variable (flag wins); see --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy.sh [options]

  --project ID            GOOGLE_CLOUD_PROJECT       project of the functions, topics and ledger (required)
  --region R              REGION                     Cloud Functions / Scheduler region (default us-central1)
  --requests-topic T      EXPORT_REQUESTS_TOPIC      default dicom-export-requests
  --events-topic T        EXPORT_EVENTS_TOPIC        default dicom-export-events
  --poll-topic T          POLL_TOPIC                 default dicom-export-poll
  --dead-letter-topic T   DEAD_LETTER_TOPIC          default dicom-export-dead-letter
  --ledger-collection C   LEDGER_COLLECTION          default dicomExports
  --service-account NAME  SERVICE_ACCOUNT            runtime account id (default dicom-export)
  --allowed-stores P      ALLOWED_DICOM_STORES       comma-separated patterns of store resource names (default: all, with a warning)
  --allowed-datasets P    ALLOWED_BQ_DATASETS        comma-separated patterns of project.dataset (default: all, with a warning)
  --dest-projects P       DEST_PROJECTS              comma-separated BigQuery destination projects that get the
                                                     Cloud Healthcare Service Agent's BigQuery roles (default: --project)
  --healthcare-datasets D HEALTHCARE_DATASETS        comma-separated projects/P/locations/L/datasets/D the runtime
                                                     account may export from (default: every dataset of --project)
  --default-store S       DEFAULT_DICOM_STORE        store used when a request names none (default none)
  --max-operation-age S   MAX_OPERATION_AGE_S        seconds before a running export is cancelled (default 86400)
  --filter-bucket B       INGEST_FILTER_BUCKET       bucket for filter files; the service agent may read it,
                                                     the runtime account may write it (default none)
  --ingest-topic T        INGEST_TOPIC               a DICOM store's notification topic: deploys ingest_notification (default none)
  --ingest-routes JSON    INGEST_ROUTES              {"store name": "bq://p.d.t"} for ingest_notification
  --schedule CRON         POLL_SCHEDULE              poller schedule (default "* * * * *")
  --dry-run                                          print every command, run none
  -h, --help
EOF
}

PROJECT=${GOOGLE_CLOUD_PROJECT:-}
REGION=${REGION:-us-central1}
REQUESTS_TOPIC=${EXPORT_REQUESTS_TOPIC:-dicom-export-requests}
EVENTS_TOPIC=${EXPORT_EVENTS_TOPIC:-dicom-export-events}
POLL_TOPIC=${POLL_TOPIC:-dicom-export-poll}
DLQ_TOPIC=${DEAD_LETTER_TOPIC:-dicom-export-dead-letter}
LEDGER=${LEDGER_COLLECTION:-dicomExports}
SA_NAME=${SERVICE_ACCOUNT:-dicom-export}
ALLOWED_STORES=${ALLOWED_DICOM_STORES:-}
ALLOWED_DATASETS=${ALLOWED_BQ_DATASETS:-}
DEST_PROJECTS=${DEST_PROJECTS:-}
HC_DATASETS=${HEALTHCARE_DATASETS:-}
DEFAULT_STORE=${DEFAULT_DICOM_STORE:-}
MAX_AGE=${MAX_OPERATION_AGE_S:-86400}
FILTER_BUCKET=${INGEST_FILTER_BUCKET:-}
INGEST_TOPIC=${INGEST_TOPIC:-}
INGEST_ROUTES=${INGEST_ROUTES:-"{}"}
SCHEDULE=${POLL_SCHEDULE:-* * * * *}
DRY_RUN=0

while [ $# -gt 0 ]; do
  case "$1" in
    --project) PROJECT=$2; shift 2 ;;
    --region) REGION=$2; shift 2 ;;
    --requests-topic) REQUESTS_TOPIC=$2; shift 2 ;;
    --events-topic) EVENTS_TOPIC=$2; shift 2 ;;
    --poll-topic) POLL_TOPIC=$2; shift 2 ;;
    --dead-letter-topic) DLQ_TOPIC=$2; shift 2 ;;
    --ledger-collection) LEDGER=$2; shift 2 ;;
    --service-account) SA_NAME=$2; shift 2 ;;
    --allowed-stores) ALLOWED_STORES=$2; shift 2 ;;
    --allowed-datasets) ALLOWED_DATASETS=$2; shift 2 ;;
    --dest-projects) DEST_PROJECTS=$2; shift 2 ;;
    --healthcare-datasets) HC_DATASETS=$2; shift 2 ;;
    --default-store) DEFAULT_STORE=$2; shift 2 ;;
    --max-operation-age) MAX_AGE=$2; shift 2 ;;
    --filter-bucket) FILTER_BUCKET=$2; shift 2 ;;
    --ingest-topic) INGEST_TOPIC=$2; shift 2 ;;
    --ingest-routes) INGEST_ROUTES=$2; shift 2 ;;
    --schedule) SCHEDULE=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "deploy.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

[ -n "$PROJECT" ] || { echo "deploy.sh: --project (or GOOGLE_CLOUD_PROJECT) is required" >&2; exit 2; }
[ -n "$DEST_PROJECTS" ] || DEST_PROJECTS=$PROJECT
case "$MAX_AGE" in ''|*[!0-9]*) echo "deploy.sh: --max-operation-age must be whole seconds" >&2; exit 2 ;; esac

SA="${SA_NAME}@${PROJECT}.iam.gserviceaccount.com"
HERE=$(cd "$(dirname "$0")" && pwd)

# run CMD...: print it; run it unless --dry-run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

# ensure "CHECK..." CMD...: run CMD only when CHECK fails (the resource is absent). In --dry-run, print CMD.
ensure() {
  local check=$1; shift
  if [ "$DRY_RUN" -eq 1 ]; then
    printf '+ (if absent: %s)' "$check"
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  if eval "$check" >/dev/null 2>&1; then
    echo "= exists: $check"
  else
    run "$@"
  fi
}

G=(gcloud --project="$PROJECT" --quiet)
ENV_FILE=$(mktemp)
LIFECYCLE=$(mktemp)
trap 'rm -f "$ENV_FILE" "$LIFECYCLE"' EXIT

echo "== APIs"
run "${G[@]}" services enable healthcare.googleapis.com pubsub.googleapis.com firestore.googleapis.com \
  cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com eventarc.googleapis.com \
  cloudscheduler.googleapis.com artifactregistry.googleapis.com logging.googleapis.com \
  bigquery.googleapis.com storage.googleapis.com

PROJECT_NUMBER=PROJECT_NUMBER
if [ "$DRY_RUN" -eq 0 ]; then
  PROJECT_NUMBER=$(gcloud projects describe "$PROJECT" --format='value(projectNumber)')
fi
HC_AGENT="service-${PROJECT_NUMBER}@gcp-sa-healthcare.iam.gserviceaccount.com"
PUBSUB_AGENT="service-${PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"

echo "== Pub/Sub topics"
for t in "$REQUESTS_TOPIC" "$EVENTS_TOPIC" "$POLL_TOPIC" "$DLQ_TOPIC"; do
  ensure "gcloud --project=$PROJECT pubsub topics describe $t" "${G[@]}" pubsub topics create "$t"
done
# Nothing that lands in the dead-letter topic is lost: it is kept on a subscription for 7 days.
ensure "gcloud --project=$PROJECT pubsub subscriptions describe ${DLQ_TOPIC}-hold" \
  "${G[@]}" pubsub subscriptions create "${DLQ_TOPIC}-hold" --topic="$DLQ_TOPIC" --message-retention-duration=7d

echo "== Firestore (the ledger)"
ensure "gcloud --project=$PROJECT firestore databases describe --database=(default)" \
  "${G[@]}" firestore databases create --location="$REGION" --type=firestore-native
ensure "gcloud --project=$PROJECT firestore indexes composite list --format=value(name) --filter=queryScope:COLLECTION AND fields.fieldPath:nextPollAt | grep -q ." \
  "${G[@]}" firestore indexes composite create --collection-group="$LEDGER" \
  --field-config=field-path=state,order=ascending --field-config=field-path=nextPollAt,order=ascending

if [ -n "$INGEST_TOPIC" ]; then
  # ingest_notification's collections: two queries, two large unqueried arrays, and TTL on finished documents
  ensure "gcloud --project=$PROJECT firestore indexes composite list --format=value(name) --filter=fields.fieldPath:arrivedAt | grep -q ." \
    "${G[@]}" firestore indexes composite create --collection-group="${LEDGER}-ingestArrivals" \
    --field-config=field-path=route,order=ascending --field-config=field-path=state,order=ascending \
    --field-config=field-path=arrivedAt,order=ascending
  ensure "gcloud --project=$PROJECT firestore indexes composite list --format=value(name) --filter=fields.fieldPath:readyAt | grep -q ." \
    "${G[@]}" firestore indexes composite create --collection-group="${LEDGER}-ingestBatches" \
    --field-config=field-path=tableKey,order=ascending --field-config=field-path=state,order=ascending \
    --field-config=field-path=readyAt,order=ascending
  for f in paths arrivalIds; do
    run "${G[@]}" firestore indexes fields update "$f" --collection-group="${LEDGER}-ingestBatches" --disable-indexes
  done
  for c in ingestArrivals ingestBatches; do
    run "${G[@]}" firestore fields ttls update expireAt --collection-group="${LEDGER}-$c" --enable-ttl
  done
fi

echo "== Runtime service account (least privilege)"
ensure "gcloud --project=$PROJECT iam service-accounts describe $SA" \
  "${G[@]}" iam service-accounts create "$SA_NAME" --display-name="DICOM export to BigQuery"
# Only what the functions call: export, read the store, follow and cancel operations.
ensure "gcloud --project=$PROJECT iam roles describe dicomExportRunner" \
  "${G[@]}" iam roles create dicomExportRunner --title="DICOM export runner" \
  --permissions=healthcare.dicomStores.export,healthcare.dicomStores.get,healthcare.operations.get,healthcare.operations.list,healthcare.operations.cancel \
  --stage=GA
ROLE="projects/${PROJECT}/roles/dicomExportRunner"
if [ -n "$HC_DATASETS" ]; then
  IFS=',' read -r -a hc_sets <<<"$HC_DATASETS"
  for ds in "${hc_sets[@]}"; do
    # projects/P/locations/L/datasets/D -> gcloud healthcare datasets add-iam-policy-binding D --location L
    loc=$(echo "$ds" | cut -d/ -f4); name=$(echo "$ds" | cut -d/ -f6); dproj=$(echo "$ds" | cut -d/ -f2)
    run gcloud --project="$dproj" --quiet healthcare datasets add-iam-policy-binding "$name" --location="$loc" \
      --member="serviceAccount:$SA" --role="$ROLE" --condition=None
  done
else
  run "${G[@]}" projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$SA" --role="$ROLE" --condition=None
fi
run "${G[@]}" pubsub topics add-iam-policy-binding "$EVENTS_TOPIC" --member="serviceAccount:$SA" --role=roles/pubsub.publisher
run "${G[@]}" pubsub topics add-iam-policy-binding "$REQUESTS_TOPIC" --member="serviceAccount:$SA" --role=roles/pubsub.publisher
run "${G[@]}" projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$SA" --role=roles/datastore.user --condition=None
run "${G[@]}" projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$SA" --role=roles/logging.logWriter --condition=None

echo "== Cloud Healthcare Service Agent: BigQuery and the filter bucket (the most common reason exports fail)"
IFS=',' read -r -a dests <<<"$DEST_PROJECTS"
for p in "${dests[@]}"; do
  run gcloud --project="$p" --quiet projects add-iam-policy-binding "$p" --member="serviceAccount:$HC_AGENT" \
    --role=roles/bigquery.dataEditor --condition=None
  run gcloud --project="$p" --quiet projects add-iam-policy-binding "$p" --member="serviceAccount:$HC_AGENT" \
    --role=roles/bigquery.jobUser --condition=None
done
if [ -n "$FILTER_BUCKET" ]; then
  ensure "gcloud --project=$PROJECT storage buckets describe gs://$FILTER_BUCKET" \
    "${G[@]}" storage buckets create "gs://$FILTER_BUCKET" --location="$REGION" --uniform-bucket-level-access
  run "${G[@]}" storage buckets add-iam-policy-binding "gs://$FILTER_BUCKET" --member="serviceAccount:$HC_AGENT" \
    --role=roles/storage.objectViewer
  run "${G[@]}" storage buckets add-iam-policy-binding "gs://$FILTER_BUCKET" --member="serviceAccount:$SA" \
    --role=roles/storage.objectCreator
  # batch filter files are only needed while their export runs: delete them after 30 days
  echo '{"rule": [{"action": {"type": "Delete"}, "condition": {"age": 30}}]}' >"$LIFECYCLE"
  run "${G[@]}" storage buckets update "gs://$FILTER_BUCKET" --lifecycle-file="$LIFECYCLE"
fi
# Pub/Sub's own agent moves undeliverable messages to the dead-letter topic.
run "${G[@]}" pubsub topics add-iam-policy-binding "$DLQ_TOPIC" --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.publisher

echo "== Functions (gen2, python312)"
yaml() {  # KEY VALUE: one double-quoted YAML line
  local v=${2//\\/\\\\}
  v=${v//\"/\\\"}
  printf '%s: "%s"\n' "$1" "$v"
}
{
  yaml GOOGLE_CLOUD_PROJECT "$PROJECT"
  yaml EXPORT_REQUESTS_TOPIC "$REQUESTS_TOPIC"
  yaml EXPORT_EVENTS_TOPIC "$EVENTS_TOPIC"
  yaml LEDGER_COLLECTION "$LEDGER"
  yaml ALLOWED_DICOM_STORES "$ALLOWED_STORES"
  yaml ALLOWED_BQ_DATASETS "$ALLOWED_DATASETS"
  yaml DEFAULT_DICOM_STORE "$DEFAULT_STORE"
  yaml MAX_OPERATION_AGE_S "$MAX_AGE"
  yaml INGEST_FILTER_BUCKET "$FILTER_BUCKET"
  yaml INGEST_ROUTES "$INGEST_ROUTES"
} >"$ENV_FILE"
if [ "$DRY_RUN" -eq 1 ]; then echo "+ (env file for every function)"; sed 's/^/    /' "$ENV_FILE"; fi

deploy_fn() {  # NAME TRIGGER-FLAGS...
  local name=$1; shift
  run "${G[@]}" functions deploy "$name" --gen2 --runtime=python312 --region="$REGION" --source="$HERE" \
    --entry-point="$name" --service-account="$SA" --env-vars-file="$ENV_FILE" --memory=512Mi "$@"
}

# Dead-letter policy on the subscription Eventarc made for a Pub/Sub-triggered function.
dead_letter() {  # FUNCTION
  local sub="projects/${PROJECT}/subscriptions/EVENTARC_SUBSCRIPTION_OF_$1"
  if [ "$DRY_RUN" -eq 0 ]; then
    sub=$(gcloud --project="$PROJECT" eventarc triggers list --location="$REGION" \
      --filter="destination.cloudRun.service:$(echo "$1" | tr '_' '-')" --format='value(transport.pubsub.subscription)' | head -n1)
  fi
  run "${G[@]}" pubsub subscriptions update "$sub" --dead-letter-topic="$DLQ_TOPIC" --max-delivery-attempts=10 \
    --min-retry-delay=10s --max-retry-delay=600s
  run "${G[@]}" pubsub subscriptions add-iam-policy-binding "$sub" --member="serviceAccount:$PUBSUB_AGENT" \
    --role=roles/pubsub.subscriber
}

deploy_fn export_request --trigger-topic="$REQUESTS_TOPIC" --retry --timeout=540s
dead_letter export_request
deploy_fn poll_exports --trigger-topic="$POLL_TOPIC" --retry --timeout=540s
dead_letter poll_exports
deploy_fn export_status --trigger-http --no-allow-unauthenticated --timeout=30s
if [ -n "$INGEST_TOPIC" ]; then
  deploy_fn ingest_notification --trigger-topic="$INGEST_TOPIC" --retry --timeout=540s
  dead_letter ingest_notification
fi

echo "== Cloud Scheduler: tick the poller"
ensure "gcloud --project=$PROJECT scheduler jobs describe dicom-export-poll --location=$REGION" \
  "${G[@]}" scheduler jobs create pubsub dicom-export-poll --location="$REGION" --schedule="$SCHEDULE" \
  --topic="$POLL_TOPIC" --message-body='{"tick":true}'
run "${G[@]}" scheduler jobs update pubsub dicom-export-poll --location="$REGION" --schedule="$SCHEDULE" \
  --topic="$POLL_TOPIC" --message-body='{"tick":true}'

cat <<EOF

Deployed. Send a first export request:

  gcloud --project=$PROJECT pubsub topics publish $REQUESTS_TOPIC --message='{
    "requestId": "first-export",
    "dicomStore": "projects/$PROJECT/locations/$REGION/datasets/DATASET/dicomStores/STORE",
    "bigqueryDestination": {"tableUri": "bq://$PROJECT.BQ_DATASET.dicom", "writeDisposition": "WRITE_TRUNCATE"}}'

Follow it: subscribe to $EVENTS_TOPIC, or
  curl -H "Authorization: Bearer \$(gcloud auth print-identity-token)" "\$(gcloud functions describe export_status --gen2 --region=$REGION --format='value(serviceConfig.uri)')?requestId=first-export"
EOF
