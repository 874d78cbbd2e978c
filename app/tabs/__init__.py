"""The app's tabs, in page order. Each module lays out its tab (`layout(page)`, putting its
components on the shared `page` namespace) and then wires its events (`wire(page)`, once every
tab exists, so an event may update another tab's components)."""
from app.tabs import ask, compare, data, inspect, tune

TABS = (data, tune, ask, inspect, compare)
