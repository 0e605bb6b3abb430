"""Qt pieces of the dock widget: generated parameter form, NCC plot and worker jobs."""
