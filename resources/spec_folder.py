"""Where prediction specs are dropped for the spec sensor."""

import dagster as dg
from pydantic import Field


class SpecFolder(dg.ConfigurableResource):
    """The folder of NAME.yaml prediction specs the spec sensor watches (relative to the working directory)."""

    path: str = Field(default="predictions", description="Folder of NAME.yaml prediction specs.")
