"""fxplan.passes.solve"""
