"""Writing dumps (torch, diffusers): loading a pipeline, planning runs, writing run folders."""
