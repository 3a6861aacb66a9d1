"""fxplan.passes.cost"""
