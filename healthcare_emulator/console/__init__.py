"""The emulator's web console (`/console`): server-rendered pages over the emulator's own REST surface.

The console is a client: every page is built from REST calls made in-process to the emulator's WSGI app
(`rest.Rest`), exactly as gcloud or google-cloud-bigquery would make them over HTTP. So Export starts an
export through the same code as `POST .../dicomStores/S:export`, and the console depends on nothing inside
the emulator but its public surface (plus one read-only look at which projects/locations hold datasets,
see `rest.healthcare_parents`: the REST surface has no projects.list/locations.list).

Hook (the only change outside this package): the emulator's dispatch sends every path that is `/console`
or starts with `/console/` to `entry.handle(app, request)`, before authentication and version routing.
"""
