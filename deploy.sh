#!/usr/bin/env bash
# Deploy the DICOM→BigQuery export service to Google Cloud. Idempotent: run it again to update.
#
#   ./deploy.sh --project my-proj --region us-central1 \
#       --allowed-stores 'projects/my-proj/locations/us-central1/datasets/*/dicomStores/*' \
#       --allowed-datasets 'my-proj.imaging' [--dry-run]
#
# Every setting is a flag or an environment variable (flag wins); see --help.
# No command goes through eval: each is a bash array, printed shell-quoted and run as it is printed.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: deploy.sh [options]

  --project ID            GOOGLE_CLOUD_PROJECT       project of the functions, topics and ledger (required)
  --region R              REGION                     Cloud Functions / Scheduler region (default us-central1)
  --requests-topic T      EXPORT_REQUESTS_TOPIC      default dicom-export-requests
  --events-topic T        EXPORT_EVENTS_TOPIC        default dicom-export-events
  --poll-topic T          POLL_TOPIC                 default dicom-export-poll
  --reconcile-topic T     RECONCILE_TOPIC            default dicom-export-reconcile (ticks reconcile_tables)
  --dead-letter-topic T   DEAD_LETTER_TOPIC          default dicom-export-dead-letter
  --ledger-collection C   LEDGER_COLLECTION          default dicomExports
  --service-account NAME  SERVICE_ACCOUNT            runtime account id (default dicom-export)
  --allowed-stores P      ALLOWED_DICOM_STORES       comma-separated patterns of store resource names (default: all, with a warning)
  --allowed-datasets P    ALLOWED_BQ_DATASETS        comma-separated patterns of project.dataset (default: all, with a warning).
                                                     The Cloud Healthcare Service Agent gets roles/bigquery.dataEditor on each
                                                     dataset named without a wildcard (and on each routed dataset) and
                                                     roles/bigquery.jobUser on its project; for a wildcard pattern it prints
                                                     the command to grant each matching dataset
  --dest-projects P       DEST_PROJECTS              comma-separated further BigQuery projects where the service agent gets
                                                     roles/bigquery.jobUser (default: the projects of the datasets above,
                                                     or --project when there are none)
  --healthcare-datasets D HEALTHCARE_DATASETS        comma-separated projects/P/locations/L/datasets/D the runtime
                                                     account may export from (default: every dataset of --project);
                                                     each project P gets its own dicomExportRunner role, and its own
                                                     Healthcare service agent the BigQuery grants
  --default-store S       DEFAULT_DICOM_STORE        store used when a request names none (default none)
  --max-operation-age S   MAX_OPERATION_AGE_S        seconds before a running export is cancelled (default 86400)
  --filter-bucket B       INGEST_FILTER_BUCKET       bucket for filter files; the service agent may read it,
                                                     the runtime account may write it (default none)
  --ingest-topic T        INGEST_TOPIC               a DICOM store's notification topic: deploys ingest_notification (default none)
  --ingest-routes JSON    INGEST_ROUTES              {"store name": "bq://p.d.t"} for ingest_notification; the runtime
                                                     account gets roles/bigquery.dataEditor on each routed dataset and
                                                     roles/bigquery.jobUser on its project (for reconcile_tables)
  --schedule CRON         POLL_SCHEDULE              poller schedule (default "* * * * *")
  --reconcile-schedule C  RECONCILE_SCHEDULE         reconcile_tables schedule (default "*/10 * * * *")
  --dry-run                                          print every command, run none
  -h, --help

--dry-run prints one line per command, shell-quoted:
  "+ CMD" always run; "? CMD" a read-only lookup; "+ [if absent] CMD", "+ [if present] CMD",
  "+ [if deleted] CMD" run according to the lookup before it.
EOF
}

PROJECT=${GOOGLE_CLOUD_PROJECT:-}
REGION=${REGION:-us-central1}
REQUESTS_TOPIC=${EXPORT_REQUESTS_TOPIC:-dicom-export-requests}
EVENTS_TOPIC=${EXPORT_EVENTS_TOPIC:-dicom-export-events}
POLL_TOPIC=${POLL_TOPIC:-dicom-export-poll}
RECONCILE_TOPIC=${RECONCILE_TOPIC:-dicom-export-reconcile}
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
RECONCILE_SCHEDULE=${RECONCILE_SCHEDULE:-*/10 * * * *}
DRY_RUN=0

while [ $# -gt 0 ]; do
  case "$1" in
    --project) PROJECT=$2; shift 2 ;;
    --region) REGION=$2; shift 2 ;;
    --requests-topic) REQUESTS_TOPIC=$2; shift 2 ;;
    --events-topic) EVENTS_TOPIC=$2; shift 2 ;;
    --poll-topic) POLL_TOPIC=$2; shift 2 ;;
    --reconcile-topic) RECONCILE_TOPIC=$2; shift 2 ;;
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
    --reconcile-schedule) RECONCILE_SCHEDULE=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "deploy.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "deploy.sh: $*" >&2; exit 2; }
[ -n "$PROJECT" ] || die "--project (or GOOGLE_CLOUD_PROJECT) is required"
case "$MAX_AGE" in ''|*[!0-9]*) die "--max-operation-age must be whole seconds" ;; esac

SA="${SA_NAME}@${PROJECT}.iam.gserviceaccount.com"
HERE=$(cd "$(dirname "$0")" && pwd)

# say PREFIX CMD...: print CMD shell-quoted (a line that can be pasted into bash as it is).
say() {
  printf '%s' "$1"; shift
  printf ' %q' "$@"
  printf '\n'
}

# run CMD...: print it; run it unless --dry-run.
run() {
  say '+' "$@"
  if [ "$DRY_RUN" -eq 0 ]; then "$@"; fi
}

# run_if CONDITION CMD...: a command chosen by a lookup; in --dry-run printed with its condition.
run_if() {
  local cond=$1; shift
  if [ "$DRY_RUN" -eq 1 ]; then say "+ [if $cond]" "$@"; else run "$@"; fi
}

# lookup CMD...: a read-only command; sets FOUND to its output ("" when it fails). In --dry-run: printed, FOUND="".
FOUND=
lookup() {
  say '?' "$@"
  FOUND=
  if [ "$DRY_RUN" -eq 0 ]; then FOUND=$("$@" 2>/dev/null) || FOUND=; fi
}

# exists CMD...: lookup CMD; true when it succeeded and printed something (the resource is there).
exists() {
  lookup "$@"
  if [ -n "$FOUND" ]; then echo "= exists"; return 0; fi
  return 1
}

# has_glob S: S contains a shell wildcard (an allowlist pattern, not one name)
has_glob() { case "$1" in *[\*\?\[]*) return 0 ;; *) return 1 ;; esac; }

# contains VALUE ITEM...: VALUE is one of the ITEMs
contains() {
  local value=$1 e; shift
  for e in "$@"; do [ "$e" = "$value" ] && return 0; done
  return 1
}

# csv_items TEXT: the non-empty, space-trimmed items of comma-separated TEXT, one a line
csv_items() {
  local item
  local -a items=()
  IFS=',' read -r -a items <<<"$1"
  for item in ${items[@]+"${items[@]}"}; do
    item=${item// /}
    [ -z "$item" ] || printf '%s\n' "$item"
  done
}

# ---- What gets which grant (all worked out before anything runs) -----------------------------------------

# Source projects: their Healthcare datasets get the runtime account's custom role, their service agents
# (which run the exports of their stores) the BigQuery grants.
HC_SETS=()
SOURCE_PROJECTS=()
while read -r ds; do
  [[ "$ds" =~ ^projects/([^/]+)/locations/([^/]+)/datasets/([^/]+)$ ]] ||
    die "--healthcare-datasets: '$ds' is not projects/PROJECT/locations/LOCATION/datasets/DATASET"
  contains "$ds" ${HC_SETS[@]+"${HC_SETS[@]}"} || HC_SETS+=("$ds")
  contains "${BASH_REMATCH[1]}" ${SOURCE_PROJECTS[@]+"${SOURCE_PROJECTS[@]}"} || SOURCE_PROJECTS+=("${BASH_REMATCH[1]}")
done < <(csv_items "$HC_DATASETS")
[ ${#HC_SETS[@]} -gt 0 ] || SOURCE_PROJECTS=("$PROJECT")

# Destination datasets as PROJECT:DATASET (bq's form; a domain-scoped project keeps its colon).
AGENT_DATASETS=()        # the service agent writes these: allowed datasets named in full, and routed ones
ROUTED_DATASETS=()       # the runtime account writes these (reconcile_tables)
WILDCARDS=()             # allowed patterns naming no single dataset: the operator grants each dataset
JOB_PROJECTS=()          # the service agent runs BigQuery jobs here
RUNTIME_JOB_PROJECTS=()  # the runtime account runs BigQuery jobs here
ALLOWED=()
add_dataset() {  # ARRAY-NAME PROJECT:DATASET
  case "$1" in
    agent) contains "$2" ${AGENT_DATASETS[@]+"${AGENT_DATASETS[@]}"} || AGENT_DATASETS+=("$2") ;;
    routed) contains "$2" ${ROUTED_DATASETS[@]+"${ROUTED_DATASETS[@]}"} || ROUTED_DATASETS+=("$2") ;;
  esac
}
add_job_project() {  # agent|runtime PROJECT
  case "$1" in
    agent) contains "$2" ${JOB_PROJECTS[@]+"${JOB_PROJECTS[@]}"} || JOB_PROJECTS+=("$2") ;;
    runtime) contains "$2" ${RUNTIME_JOB_PROJECTS[@]+"${RUNTIME_JOB_PROJECTS[@]}"} || RUNTIME_JOB_PROJECTS+=("$2") ;;
  esac
}
while read -r pat; do
  ALLOWED+=("$pat")
  proj=${pat%.*}; dset=${pat##*.}
  if [ "$proj" = "$pat" ] || has_glob "$proj"; then
    WILDCARDS+=("$pat")
  elif has_glob "$dset"; then
    WILDCARDS+=("$pat"); add_job_project agent "$proj"
  else
    [[ "$dset" =~ ^[A-Za-z0-9_]+$ ]] || die "--allowed-datasets: '$pat' is not PROJECT.DATASET"
    add_dataset agent "$proj:$dset"; add_job_project agent "$proj"
  fi
done < <(csv_items "$ALLOWED_DATASETS")
# INGEST_ROUTES values are bq://PROJECT.DATASET.TABLE (a string, or an object's tableUri); the functions
# validate the JSON itself at start (config/); here only the table URIs are needed.
while read -r uri; do
  rest=${uri#bq://}; rest=${rest%.*}; proj=${rest%.*}; dset=${rest##*.}
  [ "$proj" != "$rest" ] && [[ "$dset" =~ ^[A-Za-z0-9_]+$ ]] ||
    die "--ingest-routes: '$uri' is not bq://PROJECT.DATASET.TABLE"
  add_dataset agent "$proj:$dset"; add_job_project agent "$proj"
  add_dataset routed "$proj:$dset"; add_job_project runtime "$proj"
done < <(printf '%s\n' "$INGEST_ROUTES" | grep -o 'bq://[^"]*' || true)
while read -r p; do add_job_project agent "$p"; done < <(csv_items "$DEST_PROJECTS")
[ ${#JOB_PROJECTS[@]} -gt 0 ] || JOB_PROJECTS=("$PROJECT")

G=(gcloud --project="$PROJECT" --quiet)
ENV_FILE=$(mktemp)
LIFECYCLE=$(mktemp)
trap 'rm -f "$ENV_FILE" "$LIFECYCLE"' EXIT

echo "== APIs"
run "${G[@]}" services enable healthcare.googleapis.com pubsub.googleapis.com firestore.googleapis.com \
  cloudfunctions.googleapis.com run.googleapis.com cloudbuild.googleapis.com eventarc.googleapis.com \
  cloudscheduler.googleapis.com artifactregistry.googleapis.com logging.googleapis.com \
  bigquery.googleapis.com storage.googleapis.com

# project_number P: sets NUMBER (a placeholder in --dry-run); fails loudly when the project can't be read.
project_number() {
  lookup gcloud projects describe "$1" --format='value(projectNumber)'
  if [ "$DRY_RUN" -eq 1 ]; then NUMBER="NUMBER-OF-${1//[^a-z0-9-]/-}"; return 0; fi
  [ -n "$FOUND" ] || { echo "deploy.sh: cannot read the project number of $1 (gcloud projects describe $1)" >&2; exit 1; }
  NUMBER=$FOUND
}
project_number "$PROJECT"
PROJECT_NUMBER=$NUMBER
PUBSUB_AGENT="service-${PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"
HC_AGENTS=()   # one per source project: service-NUMBER@gcp-sa-healthcare runs the exports of its stores
for p in "${SOURCE_PROJECTS[@]}"; do
  if [ "$p" = "$PROJECT" ]; then NUMBER=$PROJECT_NUMBER; else project_number "$p"; fi
  HC_AGENTS+=("service-${NUMBER}@gcp-sa-healthcare.iam.gserviceaccount.com")
done

echo "== Pub/Sub topics"
for t in "$REQUESTS_TOPIC" "$EVENTS_TOPIC" "$POLL_TOPIC" "$RECONCILE_TOPIC" "$DLQ_TOPIC"; do
  exists "${G[@]}" pubsub topics describe "$t" --format='value(name)' ||
    run_if absent "${G[@]}" pubsub topics create "$t"
done
# Nothing that lands in the dead-letter topic is lost: it is kept on a subscription for 7 days.
exists "${G[@]}" pubsub subscriptions describe "${DLQ_TOPIC}-hold" --format='value(name)' ||
  run_if absent "${G[@]}" pubsub subscriptions create "${DLQ_TOPIC}-hold" --topic="$DLQ_TOPIC" \
    --message-retention-duration=7d

echo "== Firestore (the ledger)"
exists "${G[@]}" firestore databases describe --database='(default)' --format='value(name)' ||
  run_if absent "${G[@]}" firestore databases create --location="$REGION" --type=firestore-native

# composite_index COLLECTION-GROUP FIELD...: an ascending composite index of the collection group, unless
# one on those fields is there already (gcloud's --filter: regular expressions, evaluated by gcloud).
composite_index() {
  local group=$1; shift
  local re filter f
  local -a config=()
  re=$(printf '%s' "$group" | sed 's/[][\\.*^$+?(){}|]/\\&/g')
  filter="name~\"/collectionGroups/${re}/indexes/\" AND queryScope~\"^COLLECTION\$\""
  for f in "$@"; do
    filter+=" AND fields.fieldPath~\"^${f}\$\""
    config+=(--field-config="field-path=${f},order=ascending")
  done
  exists "${G[@]}" firestore indexes composite list --format='value(name)' --filter="$filter" ||
    run_if absent "${G[@]}" firestore indexes composite create --collection-group="$group" "${config[@]}"
}
composite_index "$LEDGER" state nextPollAt

if [ -n "$INGEST_TOPIC" ]; then
  # ingest_notification's collections: two queries, two large unqueried arrays, and TTL on finished documents
  composite_index "${LEDGER}-ingestArrivals" route state arrivedAt
  composite_index "${LEDGER}-ingestBatches" tableKey state readyAt
  for f in paths arrivalIds; do
    run "${G[@]}" firestore indexes fields update "$f" --collection-group="${LEDGER}-ingestBatches" --disable-indexes
  done
  for c in ingestArrivals ingestBatches; do
    run "${G[@]}" firestore fields ttls update expireAt --collection-group="${LEDGER}-$c" --enable-ttl
  done
fi

echo "== Runtime service account (least privilege)"
exists "${G[@]}" iam service-accounts describe "$SA" --format='value(email)' ||
  run_if absent "${G[@]}" iam service-accounts create "$SA_NAME" --display-name="DICOM export to BigQuery"

# Only what the functions call: export, read the store, follow and cancel operations. A custom role is
# a project's own: each source project gets one, bound only on that project's resources.
ROLE_ID=dicomExportRunner
PERMISSIONS=healthcare.dicomStores.export,healthcare.dicomStores.get,healthcare.operations.get
PERMISSIONS+=,healthcare.operations.list,healthcare.operations.cancel
ROLE_SPEC=(--title="DICOM export runner" --stage=GA --permissions="$PERMISSIONS")
for p in "${SOURCE_PROJECTS[@]}"; do
  GP=(gcloud --project="$p" --quiet)
  lookup "${GP[@]}" iam roles describe "$ROLE_ID" --format='value(name,deleted)'
  if [ "$DRY_RUN" -eq 1 ]; then
    say '+ [if absent]' "${GP[@]}" iam roles create "$ROLE_ID" "${ROLE_SPEC[@]}"
    say '+ [if deleted]' "${GP[@]}" iam roles undelete "$ROLE_ID"
    say '+ [if present]' "${GP[@]}" iam roles update "$ROLE_ID" "${ROLE_SPEC[@]}"
  elif [ -z "$FOUND" ]; then
    run "${GP[@]}" iam roles create "$ROLE_ID" "${ROLE_SPEC[@]}"
  else
    # a role deleted less than 7 days ago can't be created again: bring it back, then update it
    case "$FOUND" in *[Tt]rue*) run "${GP[@]}" iam roles undelete "$ROLE_ID" ;; esac
    run "${GP[@]}" iam roles update "$ROLE_ID" "${ROLE_SPEC[@]}"   # a changed permission list is applied
  fi
done
if [ ${#HC_SETS[@]} -gt 0 ]; then
  for ds in "${HC_SETS[@]}"; do
    [[ "$ds" =~ ^projects/([^/]+)/locations/([^/]+)/datasets/([^/]+)$ ]]
    dproj=${BASH_REMATCH[1]}; loc=${BASH_REMATCH[2]}; name=${BASH_REMATCH[3]}
    run gcloud --project="$dproj" --quiet healthcare datasets add-iam-policy-binding "$name" --location="$loc" \
      --member="serviceAccount:$SA" --role="projects/${dproj}/roles/${ROLE_ID}"
  done
else
  run "${G[@]}" projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$SA" \
    --role="projects/${PROJECT}/roles/${ROLE_ID}" --condition=None
fi
run "${G[@]}" pubsub topics add-iam-policy-binding "$EVENTS_TOPIC" --member="serviceAccount:$SA" --role=roles/pubsub.publisher
run "${G[@]}" pubsub topics add-iam-policy-binding "$REQUESTS_TOPIC" --member="serviceAccount:$SA" --role=roles/pubsub.publisher
run "${G[@]}" projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$SA" --role=roles/datastore.user --condition=None
run "${G[@]}" projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$SA" --role=roles/logging.logWriter --condition=None

# dataset_grant MEMBER PROJECT:DATASET: roles/bigquery.dataEditor on that dataset only (its IAM policy)
dataset_grant() {
  run bq --headless --project_id="${2%:*}" add-iam-policy-binding --dataset --member="$1" \
    --role=roles/bigquery.dataEditor "$2"
}
# job_grant MEMBER PROJECT: roles/bigquery.jobUser (run jobs; it reads no data) on the project
job_grant() {
  run gcloud --project="$2" --quiet projects add-iam-policy-binding "$2" --member="$1" \
    --role=roles/bigquery.jobUser --condition=None
}

if [ ${#ROUTED_DATASETS[@]} -gt 0 ]; then
  echo "== Runtime service account: the routed datasets (reconcile_tables)"
  for d in "${ROUTED_DATASETS[@]}"; do dataset_grant "serviceAccount:$SA" "$d"; done
  for p in "${RUNTIME_JOB_PROJECTS[@]}"; do job_grant "serviceAccount:$SA" "$p"; done
fi

echo "== Cloud Healthcare Service Agent: BigQuery and the filter bucket (the most common reason exports fail)"
# Each source project's agent runs that project's exports: it writes the destination datasets (and only
# them: dataEditor on each dataset, not on the project) and runs load jobs in the destination projects.
for agent in "${HC_AGENTS[@]}"; do
  for d in ${AGENT_DATASETS[@]+"${AGENT_DATASETS[@]}"}; do dataset_grant "serviceAccount:$agent" "$d"; done
  for p in "${JOB_PROJECTS[@]}"; do job_grant "serviceAccount:$agent" "$p"; done
done
if [ ${#ALLOWED[@]} -eq 0 ] || [ ${#WILDCARDS[@]} -gt 0 ]; then
  {
    if [ ${#ALLOWED[@]} -eq 0 ]; then
      echo "WARNING: --allowed-datasets is not set: the service agent can write no dataset but the routed ones."
    else
      echo "WARNING: ${WILDCARDS[*]} name no single dataset: the service agent gets no write access from them."
    fi
    echo "  Grant each destination dataset (PROJECT:DATASET) before exporting to it:"
    for agent in "${HC_AGENTS[@]}"; do
      echo "    bq add-iam-policy-binding --dataset --member=serviceAccount:$agent --role=roles/bigquery.dataEditor PROJECT:DATASET"
    done
  } >&2
fi
if [ -n "$FILTER_BUCKET" ]; then
  exists "${G[@]}" storage buckets describe "gs://$FILTER_BUCKET" --format='value(name)' ||
    run_if absent "${G[@]}" storage buckets create "gs://$FILTER_BUCKET" --location="$REGION" --uniform-bucket-level-access
  for agent in "${HC_AGENTS[@]}"; do
    run "${G[@]}" storage buckets add-iam-policy-binding "gs://$FILTER_BUCKET" --member="serviceAccount:$agent" \
      --role=roles/storage.objectViewer
  done
  run "${G[@]}" storage buckets add-iam-policy-binding "gs://$FILTER_BUCKET" --member="serviceAccount:$SA" \
    --role=roles/storage.objectCreator
  # batch filter files are only needed while their export runs: delete them after 30 days
  echo '{"rule": [{"action": {"type": "Delete"}, "condition": {"age": 30}}]}' >"$LIFECYCLE"
  if [ "$DRY_RUN" -eq 1 ]; then echo "+ (lifecycle file)"; sed 's/^/    /' "$LIFECYCLE"; fi
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

# Dead-letter policy on the subscription Eventarc made for a Pub/Sub-triggered function: the function's
# trigger, then the trigger's subscription. Found nothing: stop (never update a subscription named '').
dead_letter() {  # FUNCTION
  local sub="projects/${PROJECT}/subscriptions/EVENTARC-SUBSCRIPTION-OF-${1//_/-}" trigger="TRIGGER-OF-${1//_/-}"
  lookup "${G[@]}" functions describe "$1" --gen2 --region="$REGION" --format='value(eventTrigger.trigger.basename())'
  [ "$DRY_RUN" -eq 1 ] || trigger=$FOUND
  [ -n "$trigger" ] || { echo "deploy.sh: function $1 has no Eventarc trigger; its dead-letter policy is not set" >&2; exit 1; }
  lookup "${G[@]}" eventarc triggers describe "$trigger" --location="$REGION" --format='value(transport.pubsub.subscription)'
  [ "$DRY_RUN" -eq 1 ] || sub=$FOUND
  [ -n "$sub" ] || { echo "deploy.sh: Eventarc trigger $trigger of $1 has no Pub/Sub subscription; its dead-letter policy is not set" >&2; exit 1; }
  run "${G[@]}" pubsub subscriptions update "$sub" --dead-letter-topic="$DLQ_TOPIC" --max-delivery-attempts=10 \
    --min-retry-delay=10s --max-retry-delay=600s
  run "${G[@]}" pubsub subscriptions add-iam-policy-binding "$sub" --member="serviceAccount:$PUBSUB_AGENT" \
    --role=roles/pubsub.subscriber
}

deploy_fn export_request --trigger-topic="$REQUESTS_TOPIC" --retry --timeout=540s
dead_letter export_request
deploy_fn poll_exports --trigger-topic="$POLL_TOPIC" --retry --timeout=540s
dead_letter poll_exports
deploy_fn reconcile_tables --trigger-topic="$RECONCILE_TOPIC" --retry --timeout=540s
dead_letter reconcile_tables
deploy_fn export_status --trigger-http --no-allow-unauthenticated --timeout=30s
if [ -n "$INGEST_TOPIC" ]; then
  deploy_fn ingest_notification --trigger-topic="$INGEST_TOPIC" --retry --timeout=540s
  dead_letter ingest_notification
fi

# scheduler_job NAME TOPIC CRON: a Cloud Scheduler job publishing a tick to TOPIC, created or brought up to date
scheduler_job() {
  local spec=(--location="$REGION" --schedule="$3" --topic="$2" --message-body='{"tick":true}')
  if exists "${G[@]}" scheduler jobs describe "$1" --location="$REGION" --format='value(name)'; then
    run "${G[@]}" scheduler jobs update pubsub "$1" "${spec[@]}"
  else
    run_if absent "${G[@]}" scheduler jobs create pubsub "$1" "${spec[@]}"
    [ "$DRY_RUN" -eq 0 ] || say '+ [if present]' "${G[@]}" scheduler jobs update pubsub "$1" "${spec[@]}"
  fi
}
echo "== Cloud Scheduler: tick the poller and the table reconciler"
scheduler_job dicom-export-poll "$POLL_TOPIC" "$SCHEDULE"
scheduler_job dicom-export-reconcile "$RECONCILE_TOPIC" "$RECONCILE_SCHEDULE"

cat <<EOF

Deployed. Send a first export request:

  gcloud --project=$PROJECT pubsub topics publish $REQUESTS_TOPIC --message='{
    "requestId": "first-export",
    "dicomStore": "projects/$PROJECT/locations/$REGION/datasets/DATASET/dicomStores/STORE",
    "bigqueryDestination": {"tableUri": "bq://$PROJECT.BQ_DATASET.dicom", "writeDisposition": "WRITE_TRUNCATE"}}'

Follow it: subscribe to $EVENTS_TOPIC, or
  curl -H "Authorization: Bearer \$(gcloud auth print-identity-token)" "\$(gcloud --project=$PROJECT functions describe export_status --gen2 --region=$REGION --format='value(serviceConfig.uri)')?requestId=first-export"
EOF
