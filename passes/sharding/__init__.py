"""fxplan.passes.sharding"""
